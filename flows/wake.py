"""The wake flow: one period of online learning of the memory levels."""

from __future__ import annotations

import sys
from pathlib import Path

from prefect import flow

from flows.args import command_parser
from flows.errors import reporting_errors
from flows.locked import run_locked
from flows.stage import tag_job_run
from model.config import Params, load_project
from tasks.caching import outputs_match
from tasks.guards import check_wake_inputs, lifecycle_lock
from tasks.wake import read_stream, timings_path, train_wake_period, wake_state_dir, write_metrics


def run_wake(params: Params, root: Path, period: int) -> dict:
    """The wake task (cached by inputs and code; rerun if its state is gone, damaged or not the one the cached run wrote)."""
    stream, _ = read_stream(root / params.data.out_dir, period)  # this period's rows only
    metrics = train_wake_period(params, root, stream, period)
    if not outputs_match(metrics, wake_state_dir(params, root, period)):
        metrics = train_wake_period.with_options(refresh_cache=True)(params, root, stream, period)
    return {"period": period, "task": period, **metrics}


@flow(name="wake", log_prints=True, on_running=[tag_job_run])
def wake(period: int, params_path: str = "params.yaml") -> dict:
    """Train the memory levels on period ``period`` of the stream (from the previous sleep's state)."""
    params, root = load_project(params_path)
    with lifecycle_lock(params, root):
        metrics = run_wake(params, root, period)
        write_metrics(root / params.wake.metrics_dir / f"period-{period}.json", metrics,
                      timings_path(params, root, "wake", period))
    return metrics


def check_wake(params_path: str, period: int) -> None:
    """What wake period ``period`` reads, checked before its flow starts (a DataError or CheckpointError naming
    the file): the period is a task of the prepared stream, and the state it starts from opens."""
    params, root = load_project(params_path)
    check_wake_inputs(params, root, period)


@reporting_errors("lm-sleep wake")
def main(argv: list[str] | None = None) -> int:
    ap = command_parser("lm-sleep wake", "Run one wake period of the continuum-memory model.")
    ap.add_argument("--period", type=int, required=True)
    args = ap.parse_args(argv)
    check_wake(args.params, args.period)
    return run_locked("wake", args.params, wake, args.period, args.params)


if __name__ == "__main__":
    sys.exit(main())
