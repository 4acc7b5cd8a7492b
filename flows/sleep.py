"""The sleep flows: consolidation of the levels that are due, then dreaming.

``consolidate`` and ``dream`` are the two stages of a sleep (each a DVC stage of its
own); ``sleep`` runs both in one Prefect transaction: if dreaming fails, the
consolidation's files are rolled back and the state is what the wake left.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
from prefect import flow
from prefect.transactions import transaction

from flows.args import command_parser
from flows.errors import reporting_errors
from flows.locked import run_locked
from flows.stage import tag_job_run
from model.config import Params, load_project
from tasks.caching import outputs_match
from tasks.dream import dream_and_promote
from tasks.guards import check_sleep_inputs, lifecycle_lock
from tasks.sleep import consolidate_due_levels
from tasks.wake import consolidated_state_dir, read_plan, read_stream, sleep_state_dir, timings_path, write_metrics


def _write_consolidation_metrics(params: Params, root: Path, period: int, report: dict) -> None:
    write_metrics(root / params.consolidation.metrics_dir / f"period-{period}.json", report,
                  timings_path(params, root, "consolidation", period))


def _write_dreaming_metrics(params: Params, root: Path, period: int, report: dict) -> None:
    write_metrics(root / params.dream.metrics_dir / f"period-{period}.json", report,
                  timings_path(params, root, "dreaming", period))


def run_consolidation(params: Params, root: Path, period: int, plan: dict[int, list[str]]) -> dict:
    """The consolidation task (cached; rerun if its state is gone, damaged or not the one the cached run wrote). A sleep sees label names, not examples."""
    report = consolidate_due_levels(params, root, plan, period)
    if not outputs_match(report, consolidated_state_dir(params, root, period)):
        report = consolidate_due_levels.with_options(refresh_cache=True)(params, root, plan, period)
    return report


def run_dreaming(params: Params, root: Path, period: int, stream: pd.DataFrame, plan: dict[int, list[str]]) -> dict:
    """The dream task (cached; rerun if its state is gone, damaged or not the one the cached run wrote). ``plan``: the label names seen so far."""
    report = dream_and_promote(params, root, stream, plan, period)
    if not outputs_match(report, sleep_state_dir(params, root, period)):
        report = dream_and_promote.with_options(refresh_cache=True)(params, root, stream, plan, period)
    return report


@flow(name="consolidate", log_prints=True, on_running=[tag_job_run])
def consolidate(period: int, params_path: str = "params.yaml") -> dict:
    """Knowledge Seeding of every level pair due after wake period ``period``; writes the consolidated state."""
    params, root = load_project(params_path)
    with lifecycle_lock(params, root):
        plan = read_plan(root / params.data.out_dir)
        report = run_consolidation(params, root, period, plan)
        _write_consolidation_metrics(params, root, period, report)
    return report


@flow(name="dream", log_prints=True, on_running=[tag_job_run])
def dream(period: int, params_path: str = "params.yaml") -> dict:
    """Dream about the period's tasks, gate the dreams, promote the good ones; writes the sleep state."""
    params, root = load_project(params_path)
    with lifecycle_lock(params, root):
        stream, plan = read_stream(root / params.data.out_dir, period)  # this period's rows and every label name
        report = run_dreaming(params, root, period, stream, plan)
        _write_dreaming_metrics(params, root, period, report)
    return report


@flow(name="sleep", log_prints=True, on_running=[tag_job_run])
def sleep(period: int, params_path: str = "params.yaml") -> dict:
    """A sleep after wake period ``period``: consolidation (stage 1), then dreaming (stage 2), atomically.

    Both run in one transaction; metrics are written once it has committed. Only the two
    stage tasks run inside it: a task that fails and is retried inside a transaction rolls the
    whole transaction back, so the stream (an I/O task with retries) is read before.
    """
    params, root = load_project(params_path)
    with lifecycle_lock(params, root):
        return run_sleep(params, root, period)


def run_sleep(params: Params, root: Path, period: int) -> dict:
    """Both stages of the sleep after ``period`` in one transaction, then their metrics (the caller holds the lock)."""
    stream, plan = read_stream(root / params.data.out_dir, period)  # this period's rows and every label name
    with transaction():
        consolidation = run_consolidation(params, root, period, plan)
        dreaming = run_dreaming(params, root, period, stream, plan)
    _write_consolidation_metrics(params, root, period, consolidation)
    _write_dreaming_metrics(params, root, period, dreaming)
    return {"consolidation": consolidation, "dream": dreaming}


def check_sleep(params_path: str, period: int, stage: str) -> None:
    """What the sleep after ``period`` reads, checked before its flow starts (a DataError or CheckpointError
    naming the file): the period is a task of the prepared stream, and the state the stage starts from opens."""
    params, root = load_project(params_path)
    check_sleep_inputs(params, root, period, stage)


@reporting_errors("lm-sleep sleep")
def main(argv: list[str] | None = None) -> int:
    ap = command_parser("lm-sleep sleep", "Run the sleep after one wake period (or one of its two stages).")
    ap.add_argument("--period", type=int, required=True)
    ap.add_argument("--stage", choices=["all", "consolidate", "dream"], default="all",
                    help="all: consolidation then dreaming in one transaction (default)")
    args = ap.parse_args(argv)
    check_sleep(args.params, args.period, args.stage)
    flow = {"all": sleep, "consolidate": consolidate, "dream": dream}[args.stage]
    return run_locked(f"sleep --stage {args.stage}", args.params, flow, args.period, args.params)


if __name__ == "__main__":
    sys.exit(main())
