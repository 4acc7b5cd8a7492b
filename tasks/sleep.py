"""Prefect tasks of a sleep: consolidation of the levels that are due (docs/design.md §2)."""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import torch
from prefect import get_run_logger, task
from tqdm.auto import tqdm

from model.checkpoint import open_memory_model, read_manifest, save_state
from model.config import Params
from model.consolidation import StepRecord, consolidate, due_consolidations
from model.io import atomic_path
from model.rehearsal import dream_task_inputs
from model.rewards import SemanticJudge
from tasks.caching import cache_options, remove_outputs, stamp_output, writing_outputs
from tasks.wake import TIMING, consolidated_state_dir, wake_state_dir


def _consolidation_inputs(params: Params, root: Path, period: int) -> list[Path]:
    return [wake_state_dir(params, root, period)]


@task(**cache_options(_consolidation_inputs))
def consolidate_due_levels(params: Params, root: Path, plan: dict[int, list[str]], period: int) -> dict:
    """Consolidate every level pair whose schedule fired during the wake period; save the sleep state.

    With ``consolidation.rehearsal.enabled`` the sleep first dreams inputs of every earlier
    task from their label names (``plan``: the stream's examples are not an input of a sleep) with the fast level masked,
    checks them, and distils the old model's answers on the ones that pass beside the
    period's prompts. Retention is measured apart from learning, by the evaluate stage on
    the saved states (``diagnostics``). A failure (NaN, no free slot, ...) raises before
    anything is written; one while writing removes what was written.
    """
    log = get_run_logger()
    cfg = params.consolidation
    torch.set_num_threads(params.wake.threads)
    src_dir = wake_state_dir(params, root, period)
    manifest = read_manifest(src_dir)
    meta = manifest["metadata"]
    pairs = due_consolidations(int(meta["step_before"]), int(manifest["step"]), params.cms.levels) if cfg.enabled else []
    loaded, cms, optimizer = open_memory_model(params, root, src_dir, with_optimizer=True)
    judge = SemanticJudge.load(cfg.semantic_threshold) if pairs and cfg.alpha < 1 and cfg.gamma > 0 else None
    reports, samples, timings = [], [], []
    # A period of passages only has no labels to dream about; any other task without label names is an error.
    passages_only = {t for t in meta.get("passage_periods", []) if not plan.get(t)}
    old_labels = {t: plan[t] for t in sorted(plan) if t < period and t not in passages_only}
    dreamed_inputs: list[dict] = []
    shots = [tuple(x) for x in meta.get("buffer_examples", [])]  # this period's (text, label): the dreams' style
    for src, dst in pairs:
        names = (params.cms.levels[src].name, params.cms.levels[dst].name)
        seed = params.seed * 1_009 + period * 31 + dst
        start = time.perf_counter()
        dreams, current = [], []
        if cfg.rehearsal.enabled:
            if old_labels:  # earlier tasks: the old experts dream them, the fast level masked
                dreams = dream_task_inputs(loaded.model, loaded.tokenizer, cms, old_labels, [src], cfg.rehearsal,
                                           seed=seed * 7 + 1, sampling=params.sampling, examples=shots)
            if params.cms.routing.enabled and period not in passages_only:  # this period's task, dreamed by the whole model: the next wake's negatives
                current = dream_task_inputs(loaded.model, loaded.tokenizer, cms, {period: plan[period]}, [],
                                            cfg.rehearsal, seed=seed * 7 + 2, sampling=params.sampling, examples=shots)
            samples += [{"kind": "rehearsal" if d.task < period else "current_dream",
                         "sampled_by": "old_model" if d.task < period else "model", "step": 0,
                         "prompt": d.pair(params.wake.template)[0], "text": d.text, "reference": d.label,
                         "reward": math.nan, "task": d.task, "passed": d.passed, "failed": ",".join(d.failed),
                         "src": names[0], "dst": names[1]}
                        for d in [*dreams, *current]]
        rehearsal = [d.pair(params.wake.template) for d in dreams if d.passed]
        dreamed_inputs += [{"task": d.task, "label": d.label, "text": d.text} for d in [*dreams, *current] if d.passed]
        prompts = meta["prompt_buffer"]
        dream_seconds = time.perf_counter() - start
        bar = tqdm(total=cfg.steps, desc=f"sleep {period}: consolidate {names[0]} -> {names[1]}", unit="step", leave=False)

        def on_step(r: StepRecord) -> None:
            bar.update(1)
            bar.set_postfix(gkd=f"{r.distillation:.3f}", reward=f"{r.reward:.2f}")

        try:
            res = consolidate(
                loaded.model, loaded.tokenizer, cms, src, dst, prompts, cfg, params.wake.max_length,
                judge, seed=seed, origin=f"consolidation:{names[0]}->{names[1]}@period-{period}", on_step=on_step,
                sampling=params.sampling, rehearsal=rehearsal, freeze=params.cms.freeze_consolidated,
                route_weight=params.cms.routing.weight if params.cms.routing.enabled else 0.0,
            )
        finally:
            bar.close()
        seconds = time.perf_counter() - start
        optimizer.drop_state(cms.level_parameters(src))
        optimizer.drop_state(cms.level_parameters(dst, [res.slot]))  # a fresh (or merged) slot has no wake moments
        if res.merged is not None:
            optimizer.drop_state(cms.level_parameters(dst, [res.merged.into, res.merged.freed]))
        failed = Counter(f for d in dreams for f in d.failed)
        report = {
            "src": names[0], "dst": names[1], "slot": res.slot,
            "frozen": params.cms.freeze_consolidated,
            "rehearsal": {"tasks": sorted(old_labels), "generated": len(dreams), "passed": len(rehearsal),
                          "rejected": len(dreams) - len(rehearsal), "failed_checks": dict(sorted(failed.items())),
                          "current_task_dreams": len(current),
                          "current_task_passed": sum(d.passed for d in current)},
            "merged": None if res.merged is None else asdict(res.merged),
            **({"seeded_from": res.seeded_from} if res.seeded_from is not None else {}),
            "distillation": [round(r.distillation, 5) for r in res.steps],
            "reward": [None if r.reward != r.reward else round(r.reward, 4) for r in res.steps],
            "loss": [round(r.loss, 5) for r in res.steps],
        }
        reports.append(report)
        timings.append({"src": names[0], "dst": names[1], "seconds": round(seconds, 2),
                        "rehearsal_dream_seconds": round(dream_seconds, 2)})
        samples += [{**row, "src": names[0], "dst": names[1], "task": period, "passed": True, "failed": ""}
                    for row in res.samples]
        log.info(
            f"sleep {period}: {names[0]} -> {names[1]} (slot {res.slot}) in {seconds:.0f} s; rehearsal dreams "
            f"{len(rehearsal)}/{len(dreams)} passed (tasks {sorted(old_labels)})"
            + (f"; merged slot {res.merged.freed} into {res.merged.into} first" if res.merged else "")
        )
    if not cfg.enabled:
        log.info(f"sleep {period}: consolidation disabled (consolidation.enabled false); the levels stay as the wake left them")
    elif not pairs:
        log.info(f"sleep {period}: no consolidation due (wake steps {meta['step_before']} -> {manifest['step']})")
    out = consolidated_state_dir(params, root, period)
    dreams = root / cfg.dreams_dir / f"period-{period}.parquet"
    columns = ["src", "dst", "kind", "sampled_by", "step", "prompt", "text", "reference", "reward", "task", "passed",
               "failed"]
    with writing_outputs(out, dreams):
        # The wake's prompt buffer (this period's examples) stays behind: no later stage sees it. The dreamed
        # inputs (model-written, from label names) go on: the next wake's routing negatives.
        kept = {k: v for k, v in meta.items() if k not in ("prompt_buffer", "buffer_examples")}
        save_state(cms, out, optimizer, metadata={**kept, "sleep": {"period": period, "consolidations": len(pairs)},
                                                  "dreamed_inputs": dreamed_inputs})
        with atomic_path(dreams) as tmp:
            pd.DataFrame(samples, columns=columns).to_parquet(tmp, index=False)
    return stamp_output({"period": period, "consolidations": reports, "state_dir": str(out.relative_to(root)),
                         "dreams": str(dreams.relative_to(root)), TIMING: {"consolidations": timings}}, out)


@consolidate_due_levels.on_rollback
def _undo_consolidation(transaction) -> None:
    """A later task of the same sleep failed: remove this consolidation's files (the wake state stays)."""
    remove_outputs(transaction)
