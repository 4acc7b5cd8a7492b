"""The inbox flows: new data in, and the wake and sleep of the periods it makes (issue #15).

``lm-sleep ingest PATH|s3://BUCKET/KEY`` puts a file into the inbox (checked row by row; bad rows to
quarantine). ``lm-sleep wake --inbox`` claims every accepted batch no wake has consumed as the next
period of the open stream and runs the wake; ``lm-sleep sleep --inbox`` runs that period's sleep and
evaluation; ``lm-sleep cycle`` does both. A period with nothing new is a no-op; after a crash the
unfinished period is taken up again with the same batches (the ledger says which).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from prefect import flow, get_run_logger

from flows.args import command_parser
from flows.evaluate import run_evaluate
from flows.server import command_server
from flows.sleep import run_sleep
from flows.stage import tag_job_run
from flows.wake import run_wake
from model.config import Params, load_project
from tasks.guards import lifecycle_lock
from tasks.inbox_pipeline import track_period
from tasks.intake import (
    apply_retention,
    claim_period,
    finished_period,
    inbox_params,
    ingest_file,
    last_ledger_period,
    mark_period,
    read_open_period,
    seed_rebuild,
    stage_batches,
    states_match,
)
from tasks.wake import timings_path, write_metrics


@flow(name="ingest", log_prints=True, on_running=[tag_job_run])
def ingest(src: str, params_path: str = "params.yaml", fmt: str | None = None) -> dict:
    """Put ``src`` (a path or s3://bucket/key) into the inbox; return its ledger record."""
    params, root = load_project(params_path)
    return ingest_file(params, root, src, fmt)


def _wake_due(params: Params, root: Path) -> tuple[dict | None, str]:
    """The inbox period a wake claims (the unfinished one, else the waiting batches), or None and why."""
    period = claim_period(params, root)
    if period is None:
        return None, "inbox: no new batch; nothing to learn"
    if period["status"] == "woken":
        return None, f"inbox period {period['period']}: its wake is done and its sleep is due; new batches wait"
    return period, ""


def _sleep_due(params: Params, root: Path) -> tuple[dict | None, str]:
    """The inbox period whose wake is done and whose sleep is due, or None and why."""
    period = read_open_period(params, root)
    if period is None or period["status"] != "woken":
        why = "" if period is None else f" (period {period['period']} has not finished its wake)"
        return None, f"inbox: no period waits for its sleep{why}"
    return period, ""


def _inbox_step(params_path: str, due: Callable[[Params, Path], tuple[dict | None, str]],
                step: Callable[[Params, Path, Params, dict], dict]) -> dict | None:
    """Under the state directory's lock: the inbox period ``due`` finds (None: say why, do nothing), then
    ``step(params, root, the inbox period's params, period)``."""
    params, root = load_project(params_path)
    with lifecycle_lock(params, root):
        period, why = due(params, root)
        if period is None:
            get_run_logger().info(why)
            return None
        return step(params, root, inbox_params(params, root), period)


def _wake_step(params: Params, root: Path, p: Params, period: dict) -> dict:
    metrics = run_wake(p, root, period["period"])
    write_metrics(root / p.wake.metrics_dir / f"period-{period['period']}.json", metrics,
                  timings_path(p, root, "wake", period["period"]))
    mark_period(params, root, period["period"], "woken")
    return {"period": period["period"], "batches": period["batches"], "wake": metrics}


def _sleep_step(params: Params, root: Path, p: Params, period: dict) -> dict:
    sleep = run_sleep(p, root, period["period"])
    row = run_evaluate(p, root, period["period"], summary=False)
    mark_period(params, root, period["period"], "done")
    track_period(params, root, period["period"])  # before retention: DVC keeps what retention deletes
    apply_retention(params, root)
    acc = " ".join(f"{a:.2f}" for a in row["accuracy"].values())
    get_run_logger().info(f"inbox period {period['period']}: accuracy on seen tasks after sleep: {acc}")
    return {"period": period["period"], "sleep": sleep, "evaluate": row}


@flow(name="wake-inbox", log_prints=True, on_running=[tag_job_run])
def wake_inbox(params_path: str = "params.yaml") -> dict | None:
    """Wake on the waiting batches (the next inbox period); None when nothing is new or a sleep is due first."""
    return _inbox_step(params_path, _wake_due, _wake_step)


@flow(name="sleep-inbox", log_prints=True, on_running=[tag_job_run])
def sleep_inbox(params_path: str = "params.yaml") -> dict | None:
    """Sleep after the inbox period whose wake is done, then evaluate it; None when no such period waits."""
    return _inbox_step(params_path, _sleep_due, _sleep_step)


@flow(name="cycle", log_prints=True, on_running=[tag_job_run])
def cycle(params_path: str = "params.yaml") -> dict:
    """Wake on the new batches, then sleep and evaluate: one inbox period end to end."""
    woke = wake_inbox(params_path)
    slept = sleep_inbox(params_path)
    return {"wake": woke, "sleep": slept}


@flow(name="rebuild", log_prints=True, on_running=[tag_job_run])
def rebuild(period: int, out: str, params_path: str = "params.yaml") -> dict:
    """Rebuild inbox period ``period`` in the empty directory ``out`` from the ledger (its batches, in the
    groups the periods consumed them) and check each state against the digest the ledger recorded.

    The model of any past night, even one retention deleted: ``lm-sleep predict --state OUT/state/sleep/period-N``.
    """
    log = get_run_logger()
    params, root = load_project(params_path)
    target = Path(out).resolve()
    periods = seed_rebuild(params, root, Path(params_path).resolve(), target, period)
    out_params = str(target / "params.yaml")
    for p in periods:
        stage_batches(params, target, root, p["records"])
        wake_inbox(out_params)
        sleep_inbox(out_params)
    rebuilt = last_ledger_period(params, target)
    expected = periods[-1].get("states", {})
    same = {k: rebuilt["states"].get(k) == v for k, v in expected.items()}
    log.info(f"rebuilt period {period} in {target}: " + ", ".join(f"{k} {'identical' if ok else 'DIFFERENT'}"
                                                                   for k, ok in same.items()))
    return {"period": period, "out": str(target), "identical": same}


@flow(name="replay", log_prints=True, on_running=[tag_job_run])
def replay(period: int, params_path: str = "params.yaml") -> dict:
    """Replay finished inbox period ``period`` in place: its wake, sleep and evaluation, from the state before it
    and the batches the ledger says it consumed (the command of its stage in ``pipelines/inbox/dvc.yaml``).
    The ledger is not changed; each state must come out with the digest the ledger recorded."""
    log = get_run_logger()
    params, root = load_project(params_path)
    with lifecycle_lock(params, root):
        entry = finished_period(params, root, period)
        p = inbox_params(params, root)
        metrics = run_wake(p, root, period)
        write_metrics(root / p.wake.metrics_dir / f"period-{period}.json", metrics, timings_path(p, root, "wake", period))
        run_sleep(p, root, period)
        run_evaluate(p, root, period, summary=False)
        same = states_match(params, root, period, entry.get("states", {}))
    log.info(f"replayed inbox period {period}: " + ", ".join(f"{k} {'identical' if ok else 'DIFFERENT'}"
                                                              for k, ok in same.items()))
    return {"period": period, "identical": same}


def main(argv: list[str] | None = None) -> int:
    """``python -m flows.stage intake --period N``: the inbox pipeline's stage (DVC runs it)."""
    ap = command_parser("lm-sleep replay", "Replay a finished inbox period in place from the batches it consumed "
                        "(what `dvc repro pipelines/inbox/dvc.yaml` runs); its states must equal the digests the "
                        "ledger recorded.")
    ap.add_argument("--period", type=int, required=True)
    args = ap.parse_args(argv)
    with command_server("replay"):
        result = replay(args.period, args.params)
    bad = [k for k, ok in result["identical"].items() if not ok]
    if bad:
        print(f"replay of inbox period {args.period}: {', '.join(bad)} differ from the ledger's digests", file=sys.stderr)
        return 1
    return 0


def main_rebuild(argv: list[str] | None = None) -> int:
    ap = command_parser("lm-sleep rebuild", "Rebuild a past inbox period's states from the ledger in an empty "
                        "directory and check them against the digests it recorded.")
    ap.add_argument("--period", type=int, required=True)
    ap.add_argument("--out", required=True, help="an empty (or new) directory")
    args = ap.parse_args(argv)
    with command_server("rebuild"):
        result = rebuild(args.period, args.out, args.params)
    bad = [k for k, ok in result["identical"].items() if not ok]
    if bad:
        print(f"rebuild of period {args.period}: {', '.join(bad)} differ from the ledger's digests", file=sys.stderr)
        return 1
    print(f"period {args.period} rebuilt byte for byte in {result['out']} (state/sleep/period-{args.period})")
    return 0


def main_ingest(argv: list[str] | None = None) -> int:
    ap = command_parser("lm-sleep ingest", "Put a file of new data into the inbox (CSV, JSON or JSONL; labelled "
                        "rows or plain passages); bad rows go to quarantine.")
    ap.add_argument("source", help="a file, or s3://BUCKET/KEY (endpoint from AWS_ENDPOINT_URL_S3)")
    ap.add_argument("--format", choices=["csv", "json", "jsonl"], default=None,
                    help="the file's format (default: from its suffix)")
    args = ap.parse_args(argv)
    with command_server("ingest"):
        record = ingest(args.source, args.params, args.format)
    if record["quarantined"]:
        print(f"{args.source}: {record['quarantined']} of {record['rows']} rows quarantined "
              f"(see {record['quarantine_file']} in the inbox)", file=sys.stderr)
    print(f"{args.source}: batch {record['id'][:12]}: {record['accepted']} rows accepted"
          + ("" if record["new"] else " (already in the inbox; nothing changed)"))
    return 0 if record["accepted"] else 1


def main_cycle(argv: list[str] | None = None) -> int:
    ap = command_parser("lm-sleep cycle", "Wake on every new batch of the inbox, then sleep and evaluate (one inbox "
                        "period); nothing new is a no-op.")
    args = ap.parse_args(argv)
    with command_server("cycle"):
        out = cycle(args.params)
    if out["wake"] is None and out["sleep"] is None:
        print("nothing new in the inbox")
    return 0
