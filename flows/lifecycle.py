"""The lifecycle flow: wake -> sleep cycles over the whole stream, evaluated and published after each sleep.

Each cycle runs the ``wake``, ``sleep`` and ``evaluate`` flows as subflows. Their heavy
tasks are cached by inputs and code (``tasks/caching.py``), so running the lifecycle
again after a crash resumes at the task that failed; a sleep is one transaction, so a
failed sleep leaves the state as the wake left it. The state directory is locked: a
second lifecycle on the same state refuses to start. After each cycle: a Prefect
markdown summary and metrics table, the cycle published to the artifact store, and
at the end the lifecycle report (markdown + plots).
"""

from __future__ import annotations

import sys

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.args import command_parser
from flows.evaluate import evaluate
from flows.locked import run_locked
from flows.report import report
from flows.sleep import sleep
from flows.stage import tag_job_run
from flows.wake import wake
from model.config import load_project
from tasks.guards import lifecycle_lock
from tasks.publish import default_run_id, publish_cycle_artifacts


def _cycle_markdown(row: dict, published: dict | None) -> str:
    acc = " | ".join(f"{a:.2f}" for a in row["accuracy"].values())
    lines = [
        f"## Cycle {row['period']}",
        "",
        f"| task | {' | '.join(row['accuracy'])} |",
        f"| --- | {' | '.join('---' for _ in row['accuracy'])} |",
        f"| accuracy after sleep | {acc} |",
        "",
        f"Mean accuracy on seen tasks: **{row['mean_accuracy_seen']:.3f}**; wake loss "
        f"{row['wake_loss_first']:.3f} -> {row['wake_loss_last']:.3f}.",
        "",
    ]
    for c in row["consolidations"]:
        lines.append(f"- consolidation {c['src']} -> {c['dst']} (slot {c['slot']})")
    for state, accs in (row.get("diagnostics") or {}).items():
        lines.append(f"- {state.replace('_', ' ')}: " + " ".join(f"{a:.2f}" for a in accs.values()))
    funnel = row.get("dream_funnel")
    lines.append(f"- dreams: {funnel}" if funnel else "- dreams: none")
    if published:
        where = published.get("store")
        lines.append(f"- artifacts: {where}" + (f" (upload pending: {published['error']})" if published.get("error") else ""))
    return "\n".join(lines) + "\n"


@flow(name="lifecycle", log_prints=True, on_running=[tag_job_run])
def lifecycle(params_path: str = "params.yaml") -> list[dict]:
    """For every period of the stream: wake, sleep, evaluate, publish; then the report."""
    params, root = load_project(params_path)
    run_id = default_run_id(params)
    periods = []
    with lifecycle_lock(params, root):
        for period in range(params.data.n_tasks):
            wake(period, params_path)
            sleep(period, params_path)
            row = evaluate(period, params_path)
            published = publish_cycle_artifacts(params, root, period, run_id) if params.lifecycle.publish else None
            create_markdown_artifact(markdown=_cycle_markdown(row, published), key=f"cycle-{period}",
                                     description=f"lm-sleep cycle {period}")
            create_table_artifact(
                table=[{"task": t, "accuracy": a} for t, a in row["accuracy"].items()],
                key=f"cycle-{period}-accuracy", description=f"Accuracy on seen tasks after cycle {period}",
            )
            periods.append(row)
        report(params_path)
        if params.lifecycle.publish:  # the final report goes out with the last cycle
            publish_cycle_artifacts(params, root, params.data.n_tasks - 1, run_id)
    return periods


def main(argv: list[str] | None = None) -> int:
    ap = command_parser("python -m flows.lifecycle", "Run wake/sleep cycles over the prepared stream.")
    args = ap.parse_args(argv)
    return run_locked("lifecycle", args.params, lifecycle, args.params)


if __name__ == "__main__":
    sys.exit(main())
