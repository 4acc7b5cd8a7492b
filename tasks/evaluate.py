"""Prefect tasks that measure the model: accuracy on seen tasks, the accuracy matrix."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from model.config import Params
from model.data.stream import PASSAGE_LABEL, load_stream
from model.decoding.forward import TrunkCache
from model.evaluation.knowledge import passage_recall
from model.evaluation.seen import seen_accuracy
from model.io import write_json, write_text
from model.memory.checkpoint import load_state, open_memory_model
from model.runtime import configure_torch
from tasks.wake import consolidated_state_dir, sleep_state_dir, wake_state_dir


def evaluate_seen_tasks(
    params: Params, root: Path, stream: pd.DataFrame, plan: dict[int, list[str]], period: int, state_dir: Path
) -> tuple[dict[str, float], dict[str, float] | None]:
    """Accuracy of the model in ``state_dir`` on the test rows of every task seen so far, and its routing
    shares (None without prototype routing).

    Class-incremental: each text is classified among the labels of all seen tasks.
    """
    configure_torch(params.wake.threads, params.wake.deterministic)
    loaded, cms, _ = open_memory_model(params, root, state_dir)
    return seen_accuracy(params, loaded, cms, stream, plan, period)


def recall_passages(params: Params, root: Path, stream: pd.DataFrame, period: int) -> dict | None:
    """How well the sleep state of ``period`` recalls the plain passages of every period so far, and how well the
    state before this period's wake (the last sleep's, or the base model) recalled this period's
    (:func:`model.evaluation.knowledge.passage_recall`, mean log p per token; higher is better). None without passages."""
    rows = stream[(stream["label"] == PASSAGE_LABEL) & (stream["task"] <= period)].sort_values("row_id")
    if rows.empty:
        return None
    configure_torch(params.wake.threads, params.wake.deterministic)
    loaded, cms, _ = open_memory_model(params, root, None)
    w = params.wake

    def recall(texts) -> float | None:
        return passage_recall(loaded.model, loaded.tokenizer, list(texts), w.eval_batch_size, w.max_length)

    mine = rows[rows["task"] == period]["text"]
    before = None
    prev = sleep_state_dir(params, root, period - 1) if period > 0 else None
    if len(mine) and (prev is None or prev.is_dir()):  # a state retention deleted is not measured
        if prev is not None:
            load_state(cms, prev)
        before = recall(mine)
    load_state(cms, sleep_state_dir(params, root, period))
    after = {str(t): recall(g["text"]) for t, g in rows.groupby("task")}
    return {"after_sleep": after, "before_wake": before}


def diagnose_states(
    params: Params, root: Path, stream: pd.DataFrame, plan: dict[int, list[str]], period: int
) -> tuple[dict[str, dict[str, float]], dict[str, float] | None]:
    """Where forgetting happens: accuracy of every seen task (among all seen labels) in each state of cycle ``period``.

    One model is loaded and each state's experts are loaded into it in turn (checksums verified).
    ``after_previous_sleep`` is measured on tasks 0..t as well (task t not yet learned). States a
    run did not write are left out; ``after_dreaming`` is the cycle's accuracy. Also returns the
    routing shares of that last state (None without prototype routing or without the state).
    """
    configure_torch(params.wake.threads, params.wake.deterministic)
    views = {
        "after_previous_sleep": (sleep_state_dir(params, root, period - 1) if period > 0 else None, []),
        "after_wake": (wake_state_dir(params, root, period), []),
        "after_wake_fast_masked": (wake_state_dir(params, root, period), [0]),
        "after_consolidation": (consolidated_state_dir(params, root, period), []),
        "after_dreaming": (sleep_state_dir(params, root, period), []),
    }
    loaded, cms, _ = open_memory_model(params, root, None)
    trunk = TrunkCache(cms.layer_ids[0])  # the states differ above it only: the same texts' trunk once
    out: dict[str, dict[str, float]] = {}
    routing = None
    for name, (state, masked) in views.items():
        if state is None or not state.is_dir():
            continue
        load_state(cms, state)
        with cms.since_sleep_masked(masked):  # the wake's fast experts (not kept dream experts: old ones)
            out[name], routing = seen_accuracy(params, loaded, cms, stream, plan, period, trunk)
    return out, (routing if "after_dreaming" in out else None)


def write_accuracy_summary(path: Path, periods: list[dict]) -> Path:
    """Write the accuracy matrix R[i][j] (task j after period i) and a long table for plots."""
    n = len(periods)
    matrix = [[periods[i]["accuracy"].get(str(j)) for j in range(n)] for i in range(n)]
    final = periods[-1]["accuracy"]
    summary = {"periods": n, "accuracy_matrix": matrix,
               "final_mean_accuracy": sum(final.values()) / len(final) if final else None}
    passages = [j for j in range(n) if all(str(j) not in p["accuracy"] for p in periods)]
    if passages:  # periods that read plain passages only: no accuracy of their own (docs/design.md §4)
        summary["passage_tasks"] = passages
    write_json(path, summary)
    rows = [{"period": p["period"], "task": int(t), "accuracy": a} for p in periods for t, a in p["accuracy"].items()]
    write_text(path.with_name(f"{path.stem}_accuracy.csv"), pd.DataFrame(rows).to_csv(index=False))
    return path


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def cycle_row(params: Params, root: Path, period: int, accuracy: dict[str, float]) -> dict:
    """One cycle's line of the lifecycle: accuracy on seen tasks, wake loss, consolidations, dream funnel."""
    wake = _read(root / params.wake.metrics_dir / f"period-{period}.json") or {}
    sleep = _read(root / params.consolidation.metrics_dir / f"period-{period}.json") or {}
    dream = _read(root / params.dream.metrics_dir / f"period-{period}.json") or {}
    return {
        "period": period,
        "accuracy": accuracy,
        "mean_accuracy_seen": sum(accuracy.values()) / len(accuracy) if accuracy else None,
        "wake_loss_first": wake.get("loss_first"),
        "wake_loss_last": wake.get("loss_last"),
        "consolidations": [
            {k: c.get(k) for k in ("src", "dst", "slot", "retention_loss", "accuracy_ratio")}
            for c in sleep.get("consolidations", [])
        ],
        "dream_funnel": dream.get("funnel"),
    }


@task(cache_policy=NO_CACHE)
def evaluate_cycle(params: Params, root: Path, period: int) -> dict:
    """Accuracy after the sleep of ``period`` on every seen task, with the cycle's other metrics; writes its JSON."""
    stream, plan = load_stream(root / params.data.out_dir)
    diagnostics, routes = (diagnose_states(params, root, stream, plan, period) if params.lifecycle.diagnostics
                           else (None, None))
    if diagnostics is not None and "after_dreaming" in diagnostics:  # the sleep's state, already measured
        accuracy = diagnostics["after_dreaming"]
    else:
        accuracy, routes = evaluate_seen_tasks(params, root, stream, plan, period, sleep_state_dir(params, root, period))
    row = cycle_row(params, root, period, accuracy)
    if routes:  # prototype routing: the share of each task's test texts routed to the task's own period
        row["routing_accuracy"] = routes
    if diagnostics is not None:
        row["diagnostics"] = diagnostics
    passages = recall_passages(params, root, stream, period)
    if passages is not None:  # the inbox's plain passages: recalled after the sleep, and before this period
        row["passage_recall"] = passages
    write_json(root / params.lifecycle.metrics_dir / f"period-{period}.json", row)
    return row


@task(retries=2, retry_delay_seconds=1, cache_policy=NO_CACHE)
def summarise_cycles(params: Params, root: Path) -> dict:
    """The accuracy matrix over every cycle evaluated so far (periods 0.. in order, the prepared stream's and then
    the inbox's) -> summary JSON + CSV."""
    periods = []
    for period in itertools.count():
        path = root / params.lifecycle.metrics_dir / f"period-{period}.json"
        row = _read(path)
        if row is None:
            break
        if not isinstance(row, dict) or not isinstance(row.get("accuracy"), dict):
            from reporting import ReportError  # noqa: PLC0415 (matplotlib only where a report is made)

            raise ReportError(f"{path.relative_to(root)}: expected an object with an 'accuracy' mapping")
        periods.append(row)
    if not periods:
        raise FileNotFoundError(f"{root / params.lifecycle.metrics_dir}: no evaluated cycle (period-0.json missing)")
    path = write_accuracy_summary(root / params.lifecycle.summary_path, periods)
    return json.loads(path.read_text())
