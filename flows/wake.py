"""Wake flows: one period of online learning, and every period of the prepared stream."""

from __future__ import annotations

import argparse
from pathlib import Path

from prefect import flow

from model.config import load_params
from tasks.wake import (
    evaluate_seen_tasks,
    read_stream,
    train_wake_period,
    write_period_metrics,
    write_wake_summary,
)


@flow(name="wake", log_prints=True)
def wake(period: int, params_path: str = "params.yaml") -> dict:
    """Train the fast memory on period ``period`` of the stream, then evaluate all seen tasks."""
    params = load_params(params_path)
    root = Path(params_path).resolve().parent
    stream, plan = read_stream(root / params.data.out_dir)
    train = train_wake_period(params, root, stream, period)
    accuracy = evaluate_seen_tasks(params, root, stream, plan, period)
    metrics = {"period": period, "task": period, **train, "accuracy": accuracy,
               "mean_accuracy_seen": sum(accuracy.values()) / len(accuracy)}
    write_period_metrics(root / params.wake.metrics_dir / f"period-{period}.json", metrics)
    return metrics


@flow(name="wake-stream", log_prints=True)
def wake_stream(params_path: str = "params.yaml") -> list[dict]:
    """Run the wake periods of the whole stream in order and write the accuracy matrix."""
    params = load_params(params_path)
    root = Path(params_path).resolve().parent
    periods = [wake(p, params_path) for p in range(params.data.n_tasks)]
    write_wake_summary(root / params.wake.summary_path, periods)
    for m in periods:
        acc = " ".join(f"{float(a):.2f}" for a in m["accuracy"].values())
        print(f"period {m['period']}: loss {m['loss_first']:.3f} -> {m['loss_last']:.3f}; accuracy on seen tasks: {acc}")
    return periods


def main() -> None:
    ap = argparse.ArgumentParser(description="Run wake periods of the continuum-memory model.")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--period", type=int, default=None, help="one period only (default: all, in order)")
    args = ap.parse_args()
    if args.period is None:
        wake_stream(args.params)
    else:
        wake(args.period, args.params)


if __name__ == "__main__":
    main()
