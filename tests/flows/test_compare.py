"""`lm-sleep compare`: methods x seeds on a toy stream and a tiny model, the report, resume, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from model.checkpoint import read_manifest
from model.config import ConfigError, load_params
from tasks.compare import resolve_comparison, run_dir, run_params
from tests.flows.test_lifecycle_flow import toy_project

pytestmark = pytest.mark.slow

METHODS = ["zero_shot", "icl", "finetune", "ewc", "replay", "cms", "sleep"]


def _with_comparisons(params_path: Path, methods=METHODS, seeds=(0, 1), **evaluation) -> Path:
    raw = yaml.safe_load(params_path.read_text())
    raw["evaluation"] = {
        "baselines": {"lr": 5e-3, "lora_r": 4, "lora_alpha": 8.0, "replay_buffer": 6, "replay_per_batch": 2,
                      "icl_max_length": 256},
        "comparisons": {"toy": {"methods": list(methods), "seeds": list(seeds),
                                "overrides": {"wake": {"epochs": 3}, "consolidation": {"steps": 6}}}},
        **evaluation,
    }
    params_path.write_text(yaml.safe_dump(raw))
    return params_path


def test_comparison_runs_every_method_and_seed_writes_the_report_and_resumes(tmp_path, prefect_harness):
    from flows.compare import compare

    params_path = _with_comparisons(toy_project(tmp_path))
    summary = compare("toy", str(params_path))
    params = load_params(params_path)
    comp = resolve_comparison(params, "toy")
    report = tmp_path / "reports" / "toy"
    for name in ("README.md", "metrics.json", "results.json", "runs.csv", "accuracy.csv",
                 "plots/accuracy_matrices.png", "plots/final_forgetting.png", "plots/task_accuracy.png"):
        assert (report / name).is_file(), name
    runs = pd.read_csv(report / "runs.csv")
    assert sorted(zip(runs["method"], runs["seed"])) == sorted((m, s) for m in METHODS for s in (0, 1))
    assert set(summary["summary"]) == set(METHODS)
    results = {(r["method"], r["seed"]): r for r in json.loads((report / "results.json").read_text())["runs"]}
    for (method, seed), r in results.items():
        assert len(r["accuracy"]) == 2 and list(r["accuracy"][0]) == ["0"] and list(r["accuracy"][1]) == ["0", "1"]
        assert all(0.0 <= a <= 1.0 for row in r["accuracy"] for a in row.values())
    # Same budget: every trained baseline takes exactly the wake's steps (2 tasks x 16/4 batches x 3 epochs).
    wake_steps = 2 * 4 * 3
    for m in ("finetune", "ewc", "replay"):
        assert results[(m, 0)]["gradient_steps"] == wake_steps
    assert results[("zero_shot", 0)]["gradient_steps"] == results[("icl", 0)]["gradient_steps"] == 0
    assert results[("cms", 0)]["gradient_steps_by_stage"]["wake"] == wake_steps
    assert results[("cms", 0)]["gradient_steps_by_stage"]["consolidation"] == 0
    assert results[("sleep", 0)]["gradient_steps_by_stage"]["consolidation"] > 0
    # The CMS runs ran the lifecycle in their own directories, with their switches.
    cms_dir, sleep_dir = run_dir(params, tmp_path, comp, "cms", 0), run_dir(params, tmp_path, comp, "sleep", 0)
    assert load_params(cms_dir / "params.yaml").consolidation.enabled is False
    slots = lambda d: [e for e in read_manifest(d / "state/sleep/period-1")["levels"][1]["experts"]  # noqa: E731
                       if e["active"]]
    assert len(slots(cms_dir)) == 1 and len(slots(sleep_dir)) >= 2  # no consolidation vs a new slow expert per sleep
    # Seeds draw different tasks; the zero-shot model never changes, so its seen-task-0 accuracy only moves
    # with the label set.
    s0 = pd.read_parquet(tmp_path / "state/compare/toy/data/seed-0/processed/stream.parquet")
    s1 = pd.read_parquet(tmp_path / "state/compare/toy/data/seed-1/processed/stream.parquet")
    assert not s0.equals(s1)
    metrics = json.loads((report / "metrics.json").read_text())
    assert set(metrics["methods"]) == set(METHODS) and metrics["target"]["checked"]
    for m, s in metrics["methods"].items():
        lo, hi = s["final_accuracy"]["low"], s["final_accuracy"]["high"]
        assert lo <= s["final_accuracy"]["mean"] <= hi
    md = (report / "README.md").read_text()
    assert "| sleep |" in md and "| replay | yes |" in md and "target met" in md

    # Resume: a second call finds every result on disk and runs nothing again.
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "state/compare/toy").rglob("result.json")}
    assert len(stamps) == len(METHODS) * 2
    compare("toy", str(params_path))
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_quick_applies_its_overrides_and_seeds(tmp_path):
    params_path = _with_comparisons(toy_project(tmp_path), quick={"seeds": [3], "consolidation": {"steps": 1}})
    params = load_params(params_path)
    comp = resolve_comparison(params, "toy", quick=True)
    assert comp.seeds == (3,) and comp.quick
    p = run_params(params, tmp_path, comp, "sleep", 3)
    assert p.consolidation.steps == 1 and p.seed == 3 and p.data.seed == 3 and p.wake.epochs == 3
    assert not p.lifecycle.publish
    assert Path(p.data.source.path).is_absolute() and Path(p.data.out_dir).is_absolute()
    assert run_dir(params, tmp_path, comp, "sleep", 3).parts[-3:] == ("toy-quick", "sleep", "seed-3")


@pytest.mark.parametrize(("method", "field", "value"), [
    ("cms", ("consolidation", "enabled"), False), ("cms", ("dream", "enabled"), False),
    ("sleep_consolidation", ("dream", "enabled"), False), ("no_imitation", ("consolidation", "alpha"), 1.0),
    ("no_semantic_reward", ("consolidation", "gamma"), 0.0), ("no_expansion", ("consolidation", "expand"), False),
    ("no_gradient_selection", ("dream", "importance"), "random"), ("no_random_expert", ("dream", "random_expert"), False),
    ("no_dreaming", ("dream", "enabled"), False), ("sleep", ("dream", "enabled"), True),
])
def test_each_method_sets_its_switch(tmp_path, method, field, value):
    params_path = _with_comparisons(toy_project(tmp_path), methods=[method])
    params = load_params(params_path)
    p = run_params(params, tmp_path, resolve_comparison(params, "toy"), method, 0)
    assert getattr(getattr(p, field[0]), field[1]) == value


def test_unknown_comparison_method_or_override_is_a_config_error(tmp_path):
    params_path = _with_comparisons(toy_project(tmp_path))
    params = load_params(params_path)
    with pytest.raises(ConfigError, match="no comparison 'nope'.*defined: toy"):
        resolve_comparison(params, "nope")
    with pytest.raises(ConfigError, match="no method"):
        resolve_comparison(params, "toy", methods=["no_expansion"])
    raw = yaml.safe_load(params_path.read_text())
    raw["evaluation"]["comparisons"]["toy"]["overrides"] = {"wake": {"epochz": 2}}
    params_path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"(?s)evaluation.comparisons.toy.overrides.*wake.epochz: unknown key"):
        load_params(params_path)
    raw["evaluation"]["comparisons"]["toy"] = {"methods": ["sleep", "sleep"]}
    params_path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="listed twice: sleep"):
        load_params(params_path)


@pytest.mark.parametrize(("data", "message"), [
    ({"source": {"text_field": "sentence"}}, "no field 'sentence'"),
    ({"train_per_label": 11}, "too few examples"),
    ({"n_tasks": 3}, r"need 6 labels \(data.n_tasks 3"),
])
def test_bad_data_fails_before_any_training(tmp_path, prefect_harness, data, message):
    from flows.compare import main

    params_path = _with_comparisons(toy_project(tmp_path))
    raw = yaml.safe_load(params_path.read_text())
    raw["evaluation"]["comparisons"]["toy"]["overrides"]["data"] = data
    params_path.write_text(yaml.safe_dump(raw))
    code = main(["toy", "--params", str(params_path)])
    assert code == 1
    made = {p.name for p in (tmp_path / "state/compare/toy").iterdir()} - {".lock", "data"}
    assert not made, made  # no method's run directory: nothing trained
    assert not (tmp_path / "reports" / "toy").exists()


def test_an_empty_task_is_refused_before_training():
    from model.comparison import check_stream

    stream = pd.DataFrame({"row_id": [0, 1], "task": [0, 0], "split": ["train", "test"], "text": ["a", "b"],
                           "label": ["x", "x"]})
    check_stream(stream, {0: ["x"]}, "toy.csv")
    with pytest.raises(ValueError, match="toy.csv: task 1 has no train rows"):
        check_stream(stream, {0: ["x"], 1: ["y"]}, "toy.csv")
    with pytest.raises(ValueError, match="task 0 has no labels"):
        check_stream(stream, {0: []}, "toy.csv")
