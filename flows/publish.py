"""The publish flow: every evaluated cycle of a lifecycle run to the artifact store, with the report.

The store is the local ``artifacts/`` directory unless ``LM_SLEEP_S3_BUCKET`` is set (see
``tasks/store.py``). Uploads that fail stay queued and go out with the next publish.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from prefect import flow

from model.config import load_params
from tasks.publish import default_run_id, publish_cycle_artifacts


@flow(name="publish", log_prints=True)
def publish(params_path: str = "params.yaml", run_id: str | None = None) -> list[dict]:
    """Publish each cycle that has been evaluated (``metrics/lifecycle/period-N.json`` exists)."""
    params = load_params(params_path)
    root = Path(params_path).resolve().parent
    run_id = run_id or default_run_id(params)
    out = []
    for period in range(params.data.n_tasks):
        if not (root / params.lifecycle.metrics_dir / f"period-{period}.json").is_file():
            break
        out.append(publish_cycle_artifacts(params, root, period, run_id))
    print(f"run {run_id}: published {len(out)} cycle(s)")
    return out


def queued_message(results: list[dict]) -> str | None:
    """One line saying what did not reach the store, or None when everything did."""
    pending = sorted({k for r in results for k in r.get("pending") or []})
    errors = [r["error"] for r in results if r.get("error")]
    if not pending and not errors:
        return None
    return (f"{len(pending)} upload(s) stay queued in artifacts/.outbox ({errors[-1] if errors else 'not sent'}); "
            "`lm-sleep artifacts flush` sends them when the store answers")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Publish a lifecycle run's cycles to the artifact store.")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--run-id", default=None, help="default: $LM_SLEEP_RUN_ID, lifecycle.run_id, or a params digest")
    args = ap.parse_args(argv)
    message = queued_message(publish(args.params, args.run_id))
    if message is not None:  # a scheduler or CI must see that the artifacts are not all in the store
        print(f"publish incomplete: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
