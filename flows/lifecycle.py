"""The lifecycle flow: wake -> sleep cycles over the whole stream, evaluated after each sleep."""

from __future__ import annotations

import argparse
from pathlib import Path

from prefect import flow

from flows.sleep import sleep
from flows.wake import wake
from model.config import load_params
from tasks.evaluate import evaluate_seen_tasks, write_accuracy_summary
from tasks.wake import read_stream, sleep_state_dir, write_metrics


@flow(name="lifecycle", log_prints=True)
def lifecycle(params_path: str = "params.yaml") -> list[dict]:
    """For every period of the stream: wake, sleep, then measure accuracy on all seen tasks."""
    params = load_params(params_path)
    root = Path(params_path).resolve().parent
    stream, plan = read_stream(root / params.data.out_dir)
    periods = []
    for period in range(params.data.n_tasks):
        woke = wake(period, params_path)
        slept = sleep(period, params_path)
        accuracy = evaluate_seen_tasks(params, root, stream, plan, period, sleep_state_dir(params, root, period))
        row = {"period": period, "accuracy": accuracy, "mean_accuracy_seen": sum(accuracy.values()) / len(accuracy),
               "wake_loss_first": woke["loss_first"], "wake_loss_last": woke["loss_last"],
               "consolidations": [
                   {k: c[k] for k in ("src", "dst", "slot", "seconds", "retention_loss", "accuracy_ratio")}
                   for c in slept["consolidation"]["consolidations"]
               ],
               "dream_funnel": slept["dream"].get("funnel")}
        write_metrics(root / params.lifecycle.metrics_dir / f"period-{period}.json", row)
        periods.append(row)
        acc = " ".join(f"{a:.2f}" for a in accuracy.values())
        print(f"cycle {period}: wake loss {woke['loss_first']:.3f} -> {woke['loss_last']:.3f}; "
              f"accuracy on seen tasks after sleep: {acc}")
    write_accuracy_summary(root / params.lifecycle.summary_path, periods)
    return periods


def main() -> None:
    ap = argparse.ArgumentParser(description="Run wake/sleep cycles over the prepared stream.")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args()
    lifecycle(args.params)


if __name__ == "__main__":
    main()
