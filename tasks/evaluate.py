"""Prefect tasks that measure the model: accuracy on seen tasks, the accuracy matrix."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from model.checkpoint import open_memory_model
from model.config import Params
from model.io import write_json, write_text
from model.wake import classify


@task(cache_policy=NO_CACHE)
def evaluate_seen_tasks(
    params: Params, root: Path, stream: pd.DataFrame, plan: dict[int, list[str]], period: int, state_dir: Path
) -> dict[str, float]:
    """Accuracy of the model in ``state_dir`` on the test rows of every task seen so far.

    Class-incremental: each text is classified among the labels of all seen tasks.
    """
    torch.set_num_threads(params.wake.threads)
    loaded, _, _ = open_memory_model(params, root, state_dir)
    seen = list(range(period + 1))
    labels = [lab for t in seen for lab in plan[t]]
    test = stream[(stream["split"] == "test") & (stream["task"].isin(seen))].sort_values("row_id")
    pred = classify(
        loaded.model, loaded.tokenizer, params.wake.template, list(test["text"]), labels,
        params.wake.eval_batch_size, params.wake.max_length,
    )
    correct = pd.Series([p == g for p, g in zip(pred, test["label"])], index=test.index)
    return {str(t): float(correct[test["task"] == t].mean()) for t in seen}


@task(retries=2, retry_delay_seconds=1)
def write_accuracy_summary(path: Path, periods: list[dict]) -> Path:
    """Write the accuracy matrix R[i][j] (task j after period i) and a long table for plots."""
    n = len(periods)
    matrix = [[periods[i]["accuracy"].get(str(j)) for j in range(n)] for i in range(n)]
    final = periods[-1]["accuracy"]
    summary = {"periods": n, "accuracy_matrix": matrix, "final_mean_accuracy": sum(final.values()) / len(final)}
    write_json(path, summary)
    rows = [{"period": p["period"], "task": int(t), "accuracy": a} for p in periods for t, a in p["accuracy"].items()]
    write_text(path.with_name(f"{path.stem}_accuracy.csv"), pd.DataFrame(rows).to_csv(index=False))
    return path
