"""The wake flow: one period of online learning of the memory levels."""

from __future__ import annotations

import argparse
from pathlib import Path

from prefect import flow

from model.config import load_params
from tasks.wake import read_stream, train_wake_period, write_metrics


@flow(name="wake", log_prints=True)
def wake(period: int, params_path: str = "params.yaml") -> dict:
    """Train the memory levels on period ``period`` of the stream (from the previous sleep's state)."""
    params = load_params(params_path)
    root = Path(params_path).resolve().parent
    stream, _ = read_stream(root / params.data.out_dir)
    metrics = {"period": period, "task": period, **train_wake_period(params, root, stream, period)}
    write_metrics(root / params.wake.metrics_dir / f"period-{period}.json", metrics)
    return metrics


def main() -> None:
    ap = argparse.ArgumentParser(description="Run one wake period of the continuum-memory model.")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--period", type=int, required=True)
    args = ap.parse_args()
    wake(args.period, args.params)


if __name__ == "__main__":
    main()
