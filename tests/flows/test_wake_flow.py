"""The prepare and wake flows end to end on a toy CSV and a tiny model, under Prefect."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from model.checkpoint import read_manifest
from model.loading import tiny_model
from model.wake import classify

pytestmark = pytest.mark.slow

KEYWORDS = {"alarm": "alarm", "balance": "money", "weather": "rain", "music": "song"}


def toy_project(tmp_path: Path) -> Path:
    rows = []
    for label, word in KEYWORDS.items():
        for i in range(12):
            rows.append({"utterance": f"please {word} {word} now {i}", "intent": label})
    pd.DataFrame(rows).to_csv(tmp_path / "toy.csv", index=False)
    params = {
        "seed": 0,
        "model": {"source": "tiny"},
        "cms": {
            "top_layers": 2,
            "levels": [
                {"name": "fast", "chunk_size": 1, "lr": 0.05, "n_experts": 3, "d_low": 8, "top_k": 2},
                {"name": "slow", "chunk_size": 2, "lr": 0.02, "n_experts": 3, "d_low": 8, "top_k": 2},
            ],
        },
        "data": {
            "source": {"path": "toy.csv", "format": "csv", "text_field": "utterance", "label_field": "intent",
                       "exclude_labels": []},
            "n_tasks": 2, "labels_per_task": 2, "train_per_label": 8, "test_per_label": 4, "seed": 1,
        },
        "wake": {"batch_size": 4, "epochs": 6, "max_length": 32, "threads": 1},
    }
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_prepare_then_wake_stream_learns_and_writes_everything(tmp_path, prefect_harness):
    from flows.prepare import prepare
    from flows.wake import wake_stream

    params_path = toy_project(tmp_path)
    prepare(str(params_path))
    stream = pd.read_parquet(tmp_path / "data/processed/stream.parquet")
    plan = json.loads((tmp_path / "data/processed/tasks.json").read_text())

    # Accuracy of the untouched base model on task 0, choosing among task 0's labels.
    lm = tiny_model()
    test0 = stream[(stream.task == 0) & (stream.split == "test")]
    base_pred = classify(lm.model, lm.tokenizer, "{text} -> {label}", list(test0.text), plan["0"], 16, 32)
    base_acc = sum(p == g for p, g in zip(base_pred, test0.label)) / len(test0)

    periods = wake_stream(str(params_path))
    assert [p["period"] for p in periods] == [0, 1]
    first = json.loads((tmp_path / "metrics/wake/period-0.json").read_text())
    assert first["accuracy"]["0"] > base_acc and first["accuracy"]["0"] >= 0.75
    assert first["loss_last"] < first["loss_first"]
    assert first["steps"] == 6 * 4 and first["level_updates"] == {"fast": 24, "slow": 12}
    summary = json.loads((tmp_path / "metrics/wake.json").read_text())
    assert len(summary["accuracy_matrix"]) == 2 and summary["accuracy_matrix"][0][1] is None
    assert (tmp_path / "metrics/wake_accuracy.csv").is_file()
    m1 = read_manifest(tmp_path / "state/wake/period-1")
    assert m1["step"] == 48 and m1["metadata"]["period"] == 1


def test_wake_period_without_previous_state_fails_clearly(tmp_path, prefect_harness):
    from flows.prepare import prepare
    from flows.wake import wake
    from tasks.wake import StreamError

    params_path = toy_project(tmp_path)
    prepare(str(params_path))
    with pytest.raises(StreamError, match="period-0: missing; wake period 1 needs period 0's state"):
        wake(1, str(params_path))
    assert not (tmp_path / "state/wake/period-1").exists()
