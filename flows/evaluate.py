"""The evaluate flow: accuracy on every seen task after a cycle's sleep, and the accuracy matrix so far."""

from __future__ import annotations

import sys
from pathlib import Path

from prefect import flow

from flows.args import command_parser
from flows.errors import reporting_errors
from flows.locked import run_locked
from flows.stage import tag_job_run
from model.config import Params, load_project
from tasks.evaluate import evaluate_cycle, summarise_cycles
from tasks.guards import check_evaluate_inputs, lifecycle_lock


@flow(name="evaluate", log_prints=True, on_running=[tag_job_run])
def evaluate(period: int, params_path: str = "params.yaml", summary: bool = True) -> dict:
    """Evaluate the state after the sleep of ``period``; with ``summary``, rewrite the matrix R[i][j] so far."""
    params, root = load_project(params_path)
    with lifecycle_lock(params, root):
        row = run_evaluate(params, root, period, summary)
    acc = " ".join(f"{a:.2f}" for a in row["accuracy"].values())
    print(f"cycle {period}: accuracy on seen tasks after sleep: {acc}")
    return row


def run_evaluate(params: Params, root: Path, period: int, summary: bool = True) -> dict:
    """The evaluation of ``period`` (and, with ``summary``, the matrix so far); the caller holds the lock."""
    row = evaluate_cycle(params, root, period)
    if summary:
        summarise_cycles(params, root)
    return row


def check_evaluate(params_path: str, period: int) -> None:
    """What the evaluation of ``period`` reads, checked before its flow starts: the period is a task of the
    prepared stream, and the state after its sleep opens (a DataError or CheckpointError naming the file)."""
    params, root = load_project(params_path)
    check_evaluate_inputs(params, root, period)


@reporting_errors("lm-sleep evaluate")
def main(argv: list[str] | None = None) -> int:
    ap = command_parser("lm-sleep evaluate", "Evaluate the model after one cycle's sleep.")
    ap.add_argument("--period", type=int, required=True)
    ap.add_argument("--no-summary", dest="summary", action="store_false",
                    help="only this cycle's JSON (under DVC the report stage writes the summary)")
    args = ap.parse_args(argv)
    check_evaluate(args.params, args.period)
    return run_locked("evaluate", args.params, evaluate, args.period, args.params, args.summary)


if __name__ == "__main__":
    sys.exit(main())
