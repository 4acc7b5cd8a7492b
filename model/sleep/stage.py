"""One sleep's consolidation stage: every level pair whose schedule fired during the wake, slowest first
(docs/design.md §2), with rehearsal of earlier tasks and the optimiser reset that follows each consolidation.

The stage reads only the wake's state (its prompt buffer and buffered examples are in the state's metadata)
and the label names of the tasks so far: no earlier period's examples.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from model.config import Params
from model.decoding.loading import LoadedModel
from model.memory.cms import ContinuumMemory
from model.memory.optimizer import ChunkedOptimizer
from model.sleep.consolidation import ConsolidationResult, StepRecord, consolidate, due_consolidations
from model.sleep.rehearsal import dream_task_inputs
from model.sleep.rewards import SemanticJudge


class Progress(Protocol):
    """What a consolidation reports its steps to (a tqdm bar is one)."""

    def update(self, n: int = 1) -> Any: ...
    def set_postfix(self, **kwargs: Any) -> Any: ...
    def close(self) -> Any: ...


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class SleepConsolidation:
    """What the stage did: one report and timing per consolidated pair, the dream table's rows (rehearsal and
    imitation samples), and the dreamed inputs that passed their checks (the next wake's routing negatives)."""

    pairs: list[tuple[int, int]]
    reports: list[dict] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    timings: list[dict] = field(default_factory=list)
    dreamed_inputs: list[dict] = field(default_factory=list)


def reset_moments(optimizer: ChunkedOptimizer, cms: ContinuumMemory, src: int, dst: int,
                  res: ConsolidationResult) -> None:
    """After consolidating level ``src`` into ``dst``: the freed source level, the filled slot and any merged
    slots start their next wake without Adam moments (a slot trained by consolidation has none of its own)."""
    optimizer.drop_state(cms.level_parameters(src))
    optimizer.drop_state(cms.level_parameters(dst, [res.slot]))  # a fresh (or merged) slot has no wake moments
    if res.merged is not None:
        optimizer.drop_state(cms.level_parameters(dst, [res.merged.into, res.merged.freed]))


def consolidate_due_levels(
    loaded: LoadedModel,
    cms: ContinuumMemory,
    optimizer: ChunkedOptimizer,
    params: Params,
    plan: dict[int, list[str]],
    period: int,
    meta: dict,
    step: int,
    log: Callable[[str], None] = print,
    progress: Callable[[str, int], Progress] = lambda desc, total: _Silent(),
) -> SleepConsolidation:
    """Consolidate every level pair due after the wake of ``period`` (wake steps ``meta["step_before"]`` ->
    ``step``), in place on ``cms`` and ``optimizer``.

    With ``consolidation.rehearsal.enabled`` each pair first dreams inputs of every earlier task from their
    label names (``plan``) with the source level masked, checks them, and distils the old model's answers on
    the ones that pass beside the period's prompts. A failure (NaN, no free slot, ...) raises.
    """
    cfg = params.consolidation
    pairs = due_consolidations(int(meta["step_before"]), int(step), params.cms.levels) if cfg.enabled else []
    out = SleepConsolidation(pairs=pairs)
    judge = SemanticJudge.load(cfg.semantic_threshold) if pairs and cfg.alpha < 1 and cfg.gamma > 0 else None
    # A period of passages only has no labels to dream about; any other task without label names is an error.
    passages_only = {t for t in meta.get("passage_periods", []) if not plan.get(t)}
    old_labels = {t: plan[t] for t in sorted(plan) if t < period and t not in passages_only}
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
            out.samples += [{"kind": "rehearsal" if d.task < period else "current_dream",
                             "sampled_by": "old_model" if d.task < period else "model", "step": 0,
                             "prompt": d.pair(params.wake.template)[0], "text": d.text, "reference": d.label,
                             "reward": math.nan, "task": d.task, "passed": d.passed, "failed": ",".join(d.failed),
                             "src": names[0], "dst": names[1]}
                            for d in [*dreams, *current]]
        rehearsal = [d.pair(params.wake.template) for d in dreams if d.passed]
        out.dreamed_inputs += [{"task": d.task, "label": d.label, "text": d.text}
                               for d in [*dreams, *current] if d.passed]
        prompts = meta["prompt_buffer"]
        dream_seconds = time.perf_counter() - start
        bar = progress(f"sleep {period}: consolidate {names[0]} -> {names[1]}",
                       cfg.steps + (cfg.rehearsal.steps if rehearsal else 0))

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
        reset_moments(optimizer, cms, src, dst, res)
        failed = Counter(f for d in dreams for f in d.failed)
        out.reports.append({
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
            **({"rehearsal_alone": [round(r.loss, 5) for r in res.rehearsal_steps]} if res.rehearsal_steps else {}),
        })
        out.timings.append({"src": names[0], "dst": names[1], "seconds": round(seconds, 2),
                            "rehearsal_dream_seconds": round(dream_seconds, 2)})
        out.samples += [{**row, "src": names[0], "dst": names[1], "task": period, "passed": True, "failed": ""}
                        for row in res.samples]
        log(
            f"sleep {period}: {names[0]} -> {names[1]} (slot {res.slot}) in {seconds:.0f} s; rehearsal dreams "
            f"{len(rehearsal)}/{len(dreams)} passed (tasks {sorted(old_labels)})"
            + (f"; merged slot {res.merged.freed} into {res.merged.into} first" if res.merged else "")
        )
    if not cfg.enabled:
        log(f"sleep {period}: consolidation disabled (consolidation.enabled false); the levels stay as the wake left them")
    elif not pairs:
        log(f"sleep {period}: no consolidation due (wake steps {meta['step_before']} -> {step})")
    return out


__all__ = ["Progress", "SleepConsolidation", "consolidate_due_levels", "reset_moments"]
