"""Prefect tasks of sleep stage 2: dream, gate, promote (docs/design.md §3).

A round's trials (dreaming step 4) run in this task's process, or as groups on a task
runner when ``dream.trial_workers`` > 1 (``tasks/trials.py``).
"""

from __future__ import annotations

import random
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import torch
from prefect import get_run_logger, task

from model.checkpoint import open_memory_model, read_manifest, save_state
from model.config import Params
from model.dreaming import DreamTask, dream_about, promote, task_from_examples, task_from_passage
from model.io import atomic_dir, atomic_path
from model.knowledge import load_passages
from tasks.dream_gate import gate_dream_table
from model.data import task_file
from tasks.caching import cache_options, remove_outputs, writing_outputs
from tasks.trials import trial_step
from tasks.wake import TIMING, consolidated_state_dir, sleep_state_dir


def dream_tasks(params: Params, root: Path, stream: pd.DataFrame, period: int) -> list[DreamTask]:
    """The (C, tau) tasks of one sleep, drawn (seeded) from the period's wake data or from passages."""
    cfg = params.dream
    rng = random.Random(params.seed * 7_907 + period)
    if cfg.task_source == "squad":
        passages = load_passages(root / cfg.passages)
        picks = rng.sample(range(len(passages)), min(cfg.passages_per_sleep, len(passages)))
        return [task_from_passage(passages[i], f"passage{i}", cfg) for i in picks]
    rows = stream[(stream["task"] == period) & (stream["split"] == "train")].sort_values("row_id")
    pairs = list(zip(rows["text"], rows["label"]))
    need = cfg.context_examples + cfg.tau_examples
    if len(pairs) < need:
        raise ValueError(
            f"dream: period {period} has {len(pairs)} train examples, fewer than "
            f"dream.context_examples + dream.tau_examples = {need}"
        )
    out = []
    for j in range(cfg.passages_per_sleep):
        pick = rng.sample(pairs, need)
        out.append(task_from_examples(
            pick[: cfg.context_examples], pick[cfg.context_examples :], params.wake.template, f"task{period}-{j}", cfg
        ))
    return out


def _dream_inputs(params: Params, root: Path, period: int) -> list[Path]:
    passages = [root / params.dream.passages] if params.dream.task_source == "squad" else []
    return [consolidated_state_dir(params, root, period), task_file(root / params.data.out_dir, period), *passages]


@task(**cache_options(_dream_inputs))
def dream_and_promote(params: Params, root: Path, stream: pd.DataFrame, period: int) -> dict:
    """Dream about the period's tasks, gate the dream table, train promoted dreams into the fast level.

    Reads the consolidated state, writes the sleep state, the dream table (all dreams,
    with scores, reward and gate result), the promoted dreams, and the gate report.
    Every dream rejected is a normal outcome: the sleep completes and says so. A failure
    once the gate has started removes whatever of these the task had written.
    """
    log = get_run_logger()
    cfg = params.dream
    src = consolidated_state_dir(params, root, period)
    out = sleep_state_dir(params, root, period)
    if not cfg.enabled:
        with writing_outputs(out), atomic_dir(out) as tmp:
            shutil.copytree(src, tmp, dirs_exist_ok=True)
        return {"period": period, "enabled": False, TIMING: {}}
    torch.set_num_threads(params.wake.threads)
    meta = read_manifest(src)["metadata"]
    loaded, cms, optimizer = open_memory_model(params, root, src, with_optimizer=True)
    tasks = dream_tasks(params, root, stream, period)
    start = time.perf_counter()
    rows = []
    with trial_step(params, root) as trials:
        for j, t in enumerate(tasks):
            rows += dream_about(
                loaded.model, loaded.tokenizer, cms, t, cfg, period, seed=params.seed * 1_013 + period * 37 + j,
                run_trials_fn=trials, sampling=params.sampling,
            )
    report_dir = root / cfg.reports_dir / f"period-{period}"
    tables = {name: root / cfg.dreams_dir / f"period-{period}-{name}.parquet" for name in ("dreams", "promoted")}
    with writing_outputs(report_dir, *tables.values(), out):
        gated = gate_dream_table.fn(pd.DataFrame([asdict(r) for r in rows]), cfg.gate, report_dir)
        promoted = gated[gated["promoted"]]
        losses = promote(
            loaded.model, loaded.tokenizer, cms, {t.context_id: t for t in tasks},
            list(zip(promoted["context_id"], promoted["text"])), cfg, period,
        )
        seconds = time.perf_counter() - start
        for name, frame in (("dreams", gated), ("promoted", promoted)):
            with atomic_path(tables[name]) as tmp:
                frame.to_parquet(tmp, index=False)
        save_state(cms, out, optimizer, metadata={**meta, "dream": {"period": period, "promoted": int(len(promoted))}})
    funnel = {
        "generated": int(len(gated)),
        "selected": int(gated["selected"].sum()),
        "rewarded": int((gated["reward"] == 1.0).sum()),
        "passed_gate": int(gated["gate_passed"].sum()),
        "promoted": int(len(promoted)),
        "rejected": int((~gated["promoted"]).sum()),
    }
    if funnel["promoted"] == 0:
        log.info(f"dream {period}: nothing promoted ({funnel}); the sleep goes on without dream training")
    else:
        log.info(f"dream {period}: {funnel} in {seconds:.0f} s; promotion loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    return {"period": period, "enabled": True, "funnel": funnel, "promotion_losses": losses,
            "gate_report": str((report_dir / "gate.md").relative_to(root)), TIMING: {"seconds": round(seconds, 2)}}


@dream_and_promote.on_rollback
def _undo_dreaming(transaction) -> None:
    """A later task of the same sleep failed: remove this dream stage's files (the consolidated state stays)."""
    remove_outputs(transaction)
