"""The sleep flows: consolidation of the levels that are due, then dreaming."""

from __future__ import annotations

import argparse
from pathlib import Path

from prefect import flow

from model.config import load_params
from tasks.dream import dream_and_promote
from tasks.sleep import consolidate_due_levels
from tasks.wake import read_stream, write_metrics


@flow(name="consolidate", log_prints=True)
def consolidate(period: int, params_path: str = "params.yaml") -> dict:
    """Knowledge Seeding of every level pair due after wake period ``period``; writes the sleep state."""
    params = load_params(params_path)
    root = Path(params_path).resolve().parent
    stream, plan = read_stream(root / params.data.out_dir)
    report = consolidate_due_levels(params, root, stream, plan, period)
    write_metrics(root / params.consolidation.metrics_dir / f"period-{period}.json", report)
    return report


@flow(name="dream", log_prints=True)
def dream(period: int, params_path: str = "params.yaml") -> dict:
    """Dream about the period's tasks, gate the dreams, promote the good ones; writes the sleep state."""
    params = load_params(params_path)
    root = Path(params_path).resolve().parent
    stream, _ = read_stream(root / params.data.out_dir)
    report = dream_and_promote(params, root, stream, period)
    write_metrics(root / params.dream.metrics_dir / f"period-{period}.json", report)
    return report


@flow(name="sleep", log_prints=True)
def sleep(period: int, params_path: str = "params.yaml") -> dict:
    """A sleep after wake period ``period``: consolidation (stage 1), then dreaming (stage 2)."""
    return {"consolidation": consolidate(period, params_path), "dream": dream(period, params_path)}


def main() -> None:
    ap = argparse.ArgumentParser(description="Run the sleep after one wake period.")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--period", type=int, required=True)
    args = ap.parse_args()
    sleep(args.period, args.params)


if __name__ == "__main__":
    main()
