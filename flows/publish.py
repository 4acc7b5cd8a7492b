"""The publish flow: every evaluated cycle of a lifecycle run to the artifact store, with the report.

The store is the local ``artifacts/`` directory unless ``LM_SLEEP_S3_BUCKET`` is set (see
the ``store`` package). Uploads that fail stay queued and go out with the next publish.
"""

from __future__ import annotations

import sys

from prefect import flow

from flows.args import command_parser
from flows.stage import tag_job_run
from model.config import load_project
from tasks.publish import default_run_id, last_evaluated, publish_cycle_artifacts


@flow(name="publish", log_prints=True, on_running=[tag_job_run])
def publish(params_path: str = "params.yaml", run_id: str | None = None) -> list[dict]:
    """Publish each cycle that has been evaluated (``metrics/lifecycle/period-N.json`` exists)."""
    params, root = load_project(params_path)
    run_id = run_id or default_run_id(params)
    last = last_evaluated(params, root)
    out = [publish_cycle_artifacts(params, root, period, run_id) for period in range(0 if last is None else last + 1)]
    message = queued_message(out)
    where = out[-1]["store"] if out else "the store"
    print(f"run {run_id}: {len(out)} cycle(s) published to {where}" if message is None
          else f"run {run_id}: {len(out)} cycle(s) queued, not all sent to {where}")
    return out


def queued_message(results: list[dict]) -> str | None:
    """One line saying what did not reach the store, or None when everything did.

    Each cycle's publish sends the whole outbox, so what the last one left queued is what stays;
    an earlier cycle's failure whose uploads went out with a later cycle is not reported.
    """
    pending = (results[-1].get("pending") or []) if results else []
    if not pending:
        return None
    error = next((r["error"] for r in reversed(results) if r.get("error")), None)
    return error or (f"{len(pending)} upload(s) stay queued in the outbox; `lm-sleep artifacts flush` sends them "
                     "when the store answers")


def main(argv: list[str] | None = None) -> int:
    ap = command_parser("lm-sleep publish", "Publish a lifecycle run's cycles to the artifact store.")
    ap.add_argument("--run-id", default=None, help="default: $LM_SLEEP_RUN_ID, lifecycle.run_id, or a params digest")
    args = ap.parse_args(argv)
    message = queued_message(publish(args.params, args.run_id))
    if message is not None:  # a scheduler or CI must see that the artifacts are not all in the store
        print(f"publish incomplete: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
