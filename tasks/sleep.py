"""Prefect tasks of a sleep: consolidation of the levels that are due (DESIGN §2)."""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from tqdm.auto import tqdm

from model.checkpoint import open_memory_model, read_manifest, save_state
from model.config import Params
from model.consolidation import StepRecord, consolidate, due_consolidations
from model.io import atomic_path
from model.rewards import SemanticJudge
from model.wake import heldout_metrics
from tasks.caching import cache_options, remove_outputs, writing_outputs
from tasks.wake import TIMING, consolidated_state_dir, wake_state_dir


def _heldout(params: Params, loaded, stream: pd.DataFrame, plan: dict[int, list[str]], period: int) -> dict:
    test = stream[(stream["split"] == "test") & (stream["task"] == period)].sort_values("row_id")
    return heldout_metrics(
        loaded.model, loaded.tokenizer, params.wake.template, list(test["text"]), list(test["label"]),
        plan[period], params.wake.eval_batch_size, params.wake.max_length,
    )


def _consolidation_inputs(params: Params, root: Path, period: int) -> list[Path]:
    return [wake_state_dir(params, root, period)]


@task(**cache_options(_consolidation_inputs))
def consolidate_due_levels(
    params: Params, root: Path, stream: pd.DataFrame, plan: dict[int, list[str]], period: int
) -> dict:
    """Consolidate every level pair whose schedule fired during the wake period; save the sleep state.

    Held-out measures on the period's task (loss and accuracy) are taken for (a) the
    teacher, (b) the fast level reset without consolidation, (c) after consolidation.
    A failure (NaN, no free slot, ...) raises before anything is written; one while writing
    removes what was written.
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
    for src, dst in pairs:
        teacher = _heldout(params, loaded, stream, plan, period)
        with cms.levels_masked([src]):
            reset = _heldout(params, loaded, stream, plan, period)
        names = (params.cms.levels[src].name, params.cms.levels[dst].name)
        bar = tqdm(total=cfg.steps, desc=f"sleep {period}: consolidate {names[0]} -> {names[1]}", unit="step", leave=False)

        def on_step(r: StepRecord) -> None:
            bar.update(1)
            bar.set_postfix(gkd=f"{r.distillation:.3f}", reward=f"{r.reward:.2f}")

        start = time.perf_counter()
        try:
            res = consolidate(
                loaded.model, loaded.tokenizer, cms, src, dst, meta["prompt_buffer"], cfg, params.wake.max_length,
                judge, seed=params.seed * 1_009 + period * 31 + dst,
                origin=f"consolidation:{names[0]}->{names[1]}@period-{period}", on_step=on_step,
                sampling=params.sampling,
            )
        finally:
            bar.close()
        seconds = time.perf_counter() - start
        optimizer.drop_state(cms.level_parameters(src))
        after = _heldout(params, loaded, stream, plan, period)
        gap = reset["loss"] - teacher["loss"]
        acc_gap = teacher["accuracy"] - reset["accuracy"]
        report = {
            "src": names[0], "dst": names[1], "slot": res.slot,
            "teacher": teacher, "reset": reset, "consolidated": after,
            "retention_loss": (reset["loss"] - after["loss"]) / gap if gap else None,
            "retention_accuracy": (after["accuracy"] - reset["accuracy"]) / acc_gap if acc_gap else None,
            "accuracy_ratio": after["accuracy"] / teacher["accuracy"] if teacher["accuracy"] else None,
            "distillation": [round(r.distillation, 5) for r in res.steps],
            "reward": [None if r.reward != r.reward else round(r.reward, 4) for r in res.steps],
            "loss": [round(r.loss, 5) for r in res.steps],
        }
        reports.append(report)
        timings.append({"src": names[0], "dst": names[1], "seconds": round(seconds, 2)})
        samples += [{**row, "src": names[0], "dst": names[1]} for row in res.samples]
        log.info(
            f"sleep {period}: {names[0]} -> {names[1]} (slot {res.slot}) in {seconds:.0f} s; loss teacher "
            f"{teacher['loss']:.3f} reset {reset['loss']:.3f} consolidated {after['loss']:.3f}; accuracy "
            f"{teacher['accuracy']:.2f} / {reset['accuracy']:.2f} / {after['accuracy']:.2f}"
        )
    if not cfg.enabled:
        log.info(f"sleep {period}: consolidation disabled (consolidation.enabled false); the levels stay as the wake left them")
    elif not pairs:
        log.info(f"sleep {period}: no consolidation due (wake steps {meta['step_before']} -> {manifest['step']})")
    out = consolidated_state_dir(params, root, period)
    dreams = root / cfg.dreams_dir / f"period-{period}.parquet"
    columns = ["src", "dst", "kind", "sampled_by", "step", "prompt", "text", "reference", "reward"]
    with writing_outputs(out, dreams):
        save_state(cms, out, optimizer, metadata={**meta, "sleep": {"period": period, "consolidations": len(pairs)}})
        with atomic_path(dreams) as tmp:
            pd.DataFrame(samples, columns=columns).to_parquet(tmp, index=False)
    return {"period": period, "consolidations": reports, "state_dir": str(out.relative_to(root)),
            "dreams": str(dreams.relative_to(root)), TIMING: {"consolidations": timings}}


@consolidate_due_levels.on_rollback
def _undo_consolidation(transaction) -> None:
    """A later task of the same sleep failed: remove this consolidation's files (the wake state stays)."""
    remove_outputs(transaction)
