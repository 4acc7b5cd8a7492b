"""`lm-sleep compare`: methods x seeds on a toy stream and a tiny model, the report, resume, bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
import yaml

from model.config import ConfigError, load_params
from model.memory.checkpoint import read_manifest
from tasks.compare import resolve_comparison, run_dir, run_key, run_params
from tests.flows.test_lifecycle_flow import toy_project

pytestmark = pytest.mark.slow

METHODS = ["zero_shot", "icl", "finetune", "ewc", "replay", "joint", "sentence_lda", "cms", "sleep"]


def _with_comparisons(params_path: Path, methods=METHODS, seeds=(0, 1), **evaluation) -> Path:
    raw = yaml.safe_load(params_path.read_text())
    raw["evaluation"] = {
        "baselines": {"lr": 5e-3, "lora_r": 4, "lora_alpha": 8.0, "replay_buffer": 6, "replay_per_batch": 2,
                      "icl_max_length": 256},
        "comparisons": {"toy": {"methods": list(methods), "seeds": list(seeds),
                                "overrides": {"wake": {"epochs": 3}, "consolidation": {"steps": 6},
                                              "lifecycle": {"diagnostics": False}}}},
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
    for m in ("finetune", "ewc", "replay", "joint"):
        assert results[(m, 0)]["gradient_steps"] == wake_steps  # joint: its final model, both tasks at once
    # Where forgetting happens: the sleep run measured every state of every cycle (lifecycle.diagnostics).
    diag = results[("sleep", 0)]["diagnostics"]
    assert set(diag[1]) == {"after_previous_sleep", "after_wake", "after_wake_fast_masked", "after_consolidation",
                            "after_dreaming"} and set(diag[0]) == set(diag[1]) - {"after_previous_sleep"}
    assert diag[1]["after_dreaming"] == results[("sleep", 0)]["accuracy"][1]
    assert results[("cms", 0)]["diagnostics"] == [None, None]  # off for the other methods (comparison overrides)
    assert "## Where forgetting happens" in (report / "README.md").read_text()
    assert set(pd.read_csv(report / "diagnostics.csv")["method"]) == {"sleep"}
    # Prototype routing: every CMS-family run records where its test inputs were routed, cycle by cycle.
    for m in ("cms", "sleep"):
        shares = results[(m, 0)]["routing_accuracy"]
        assert [sorted(s) for s in shares] == [["0"], ["0", "1"]] and all(0 <= v <= 1 for s in shares for v in s.values())
    assert results[("finetune", 0)].get("routing_accuracy") is None
    assert "## Routing" in (report / "README.md").read_text()
    assert results[("zero_shot", 0)]["gradient_steps"] == results[("icl", 0)]["gradient_steps"] == 0
    assert results[("sentence_lda", 0)]["gradient_steps"] == 0  # means and a covariance, no training
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
    # Every run, baseline or lifecycle, records the machine it computed on; all of these share one.
    ids = {r["machine"]["id"] for r in results.values()}
    assert metrics["machines"] == sorted(ids) and len(ids) == 1
    assert results[("sleep", 0)]["machine"]["threads"] == params.wake.threads
    for m, s in metrics["methods"].items():
        lo, hi = s["final_accuracy"]["low"], s["final_accuracy"]["high"]
        assert lo <= s["final_accuracy"]["mean"] <= hi
    md = (report / "README.md").read_text()
    assert "| sleep |" in md and "| replay | yes |" in md and "| sentence_lda | no |" in md and "target met" in md

    # Resume: a second call finds every result on disk and runs nothing again.
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "state/compare/toy").rglob("result.json")}
    assert len(stamps) == len(METHODS) * 2
    compare("toy", str(params_path))
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    # A report over the runs that have finished: nothing runs, the missing run is left out.
    (run_dir(params, tmp_path, comp, "ewc", 1) / "result.json").unlink()
    partial = compare("toy", str(params_path), report_only=True)
    assert partial["summary"]["ewc"]["seeds"] == [0] and partial["summary"]["sleep"]["seeds"] == [0, 1]
    assert not (run_dir(params, tmp_path, comp, "ewc", 1) / "result.json").exists()
    assert partial["target"]["margins"]["ewc"]["seeds"] == [0]


def test_runs_on_two_workers_equal_the_runs_one_by_one(tmp_path, prefect_harness):
    """evaluation.workers = 2: every run (method x seed) is a task on a local Dask cluster of two processes; the
    results are those of the runs one after the other, and where the runs went is not in their key."""
    from flows.compare import compare
    from tests.flows.test_faults import task_states_of

    methods = ["finetune", "sleep"]
    one = _with_comparisons(toy_project(tmp_path / "one"), methods=methods, seeds=(0,))
    two = _with_comparisons(toy_project(tmp_path / "two"), methods=methods, seeds=(0,), workers=2)
    compare("toy", str(one))
    state = compare("toy", str(two), return_state=True)
    assert task_states_of(state, "comparison-run", 2) == ["Completed"] * 2  # each run a task on the runner
    runs = {}
    for root in ("one", "two"):
        for path in sorted((tmp_path / root / "state/compare/toy").glob("*/seed-*/result.json")):
            r = json.loads(path.read_text())
            runs.setdefault((r["method"], r["seed"]), []).append(r)
    assert sorted(runs) == [(m, 0) for m in methods]
    for (method, seed), (a, b) in runs.items():
        assert a["accuracy"] == b["accuracy"] and a["gradient_steps"] == b["gradient_steps"], (method, seed)
        assert a.get("losses") == b.get("losses"), (method, seed)
    # Where the runs go is not what they compute: the same params with workers = 1 find every run finished.
    params = load_params(two)
    comp = resolve_comparison(params, "toy")
    for method in methods:
        p = run_params(params, tmp_path / "two", comp, method, 0)
        unscaled = p.model_copy(update={"evaluation": p.evaluation.model_copy(update={"workers": 1})})
        assert run_key(p, method) == run_key(unscaled, method)


def test_the_command_line_keeps_the_comparisons_with_device_and_workers(tmp_path):
    from flows.compare import with_run_options

    params = load_params(_with_comparisons(toy_project(tmp_path)))
    got = with_run_options(params, "cpu", 3)
    assert got.model.device == "cpu" and got.evaluation.workers == 3 and set(got.evaluation.comparisons) == {"toy"}
    assert with_run_options(params) == params


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
    ("no_rehearsal", ("consolidation", "rehearsal", "enabled"), False),
    ("no_freezing", ("cms", "freeze_consolidated"), False), ("with_routing", ("cms", "routing", "enabled"), True),
    ("sleep", ("lifecycle", "diagnostics"), True), ("no_promotion_check", ("dream", "promotion_check"), False),
    ("sleep", ("dream", "promotion_check"), True), ("dreams_into_slow", ("dream", "train_into"), "consolidated"),
    ("sleep", ("dream", "train_into"), "fast"), ("fold_dreams", ("dream", "fold_into_slow"), True),
    ("fold_dreams", ("dream", "fold_dream_weight"), 0.0), ("fold_with_dreams", ("dream", "fold_dream_weight"), 1.0),
    ("no_dream_policy", ("dream", "policy", "enabled"), False), ("sleep", ("dream", "policy", "enabled"), True),
    ("keep_dreams", ("dream", "keep_dreams"), True), ("sleep", ("dream", "keep_dreams"), True),
    ("sleep", ("dream", "keep_dreams_in"), "slow"),
    ("no_keep_dreams", ("dream", "keep_dreams"), False), ("keep_dreams_slow", ("dream", "keep_dreams"), True),
    ("keep_dreams_slow", ("dream", "keep_dreams_in"), "slow"), ("keep_dreams", ("dream", "keep_dreams_in"), "fast"),
    ("same_period_merge", ("consolidation", "merge_pair"), "same_period"), ("sleep", ("consolidation", "merge_pair"), "same_period"),
    ("oldest_merge", ("consolidation", "merge_pair"), "oldest"),
    ("merge_in_view", ("consolidation", "merge_in_view"), True),
    ("merge_both_starts", ("consolidation", "merge_start"), "both"),
    ("check_merged_periods", ("dream", "check_merged_periods"), True),
    ("sleep", ("dream", "check_merged_periods"), False), ("sleep", ("consolidation", "merge_start"), "larger"), ("sleep", ("consolidation", "merge_in_view"), False),
    ("absorb_dreams", ("dream", "keep_dreams_when_full"), "absorb"), ("sleep", ("dream", "keep_dreams_when_full"), "absorb"),
    ("merge_for_dreams", ("dream", "keep_dreams_when_full"), "merge"),
    ("sentence_routing", ("cms", "routing", "feature"), "sentence"), ("sleep", ("cms", "routing", "feature"), "decoder"),
    ("decoder_routing", ("cms", "routing", "feature"), "decoder"),
])
def test_each_method_sets_its_switch(tmp_path, method, field, value):
    params_path = _with_comparisons(toy_project(tmp_path), methods=[method])
    params = load_params(params_path)
    p = run_params(params, tmp_path, resolve_comparison(params, "toy"), method, 0)
    for name in field:
        p = getattr(p, name)
    assert p == value


def test_one_teacher_sample_sets_one_where_the_project_samples_two(tmp_path):
    """params.yaml's consolidation samples 2 teacher continuations per prompt (its dev rule); the method
    one_teacher_sample is the sleep before it, and sleep keeps the project's 2."""
    params_path = _with_comparisons(toy_project(tmp_path), methods=["sleep", "one_teacher_sample"])
    doc = yaml.safe_load(params_path.read_text())
    doc["consolidation"]["samples_per_prompt"] = 2
    params_path.write_text(yaml.safe_dump(doc))
    params = load_params(params_path)
    got = {m: run_params(params, tmp_path, resolve_comparison(params, "toy"), m, 0).consolidation.samples_per_prompt
           for m in ("sleep", "one_teacher_sample")}
    assert got == {"sleep": 2, "one_teacher_sample": 1}


def test_zero_start_is_the_papers_expansion_where_the_project_copies_the_fast_expert(tmp_path):
    """params.yaml's consolidation starts the new slow expert as the wake's fast expert (init copy, its dev rule); the
    method zero_start is the sleep before it (B = 0), and sleep keeps the project's copy."""
    params_path = _with_comparisons(toy_project(tmp_path), methods=["sleep", "zero_start"])
    doc = yaml.safe_load(params_path.read_text())
    doc["consolidation"]["init"] = "copy"
    params_path.write_text(yaml.safe_dump(doc))
    params = load_params(params_path)
    got = {m: run_params(params, tmp_path, resolve_comparison(params, "toy"), m, 0).consolidation.init
           for m in ("sleep", "zero_start")}
    assert got == {"sleep": "copy", "zero_start": "zero"}
    assert load_params(Path(__file__).resolve().parents[2] / "params.yaml").consolidation.init == "copy"  # the project's own


def test_the_comparisons_keep_the_copy_alone_and_the_distillation_switches_still_distil(tmp_path):
    """The comparisons' budget consolidates by the copy alone (consolidation.steps 0, its dev rule); the methods that
    switch a part of the distillation (and copy_distilled, the sleep before) distil DISTILLATION_STEPS steps, or they
    would switch nothing."""
    from model.config.evaluation import DISTILLATION_STEPS

    distilling = ["copy_distilled", "zero_start", "no_imitation", "no_semantic_reward", "one_teacher_sample",
                  "no_expansion", "fold_dreams", "fold_with_dreams"]
    params_path = _with_comparisons(toy_project(tmp_path), methods=["sleep", *distilling])
    doc = yaml.safe_load(params_path.read_text())
    doc["consolidation"]["init"] = "copy"  # as the project's
    doc["evaluation"]["comparisons"]["toy"]["overrides"]["consolidation"]["steps"] = 0
    params_path.write_text(yaml.safe_dump(doc))
    params = load_params(params_path)
    comp = resolve_comparison(params, "toy")
    got = {m: run_params(params, tmp_path, comp, m, 0).consolidation.steps for m in ["sleep", *distilling]}
    assert got == {"sleep": 0, **{m: DISTILLATION_STEPS for m in distilling}}
    project = load_params(Path(__file__).resolve().parents[2] / "params.yaml")
    assert {project.evaluation.comparisons[c].overrides["consolidation"]["steps"] for c in ("default", "default-5")} == {0}
    # what a report says of them names the number, not the constant
    from model.config import METHODS as DESCRIPTIONS

    assert all(f"{DISTILLATION_STEPS} steps" in DESCRIPTIONS[m] for m in ("copy_distilled", "zero_start", "no_expansion"))
    assert not [m for m, text in DESCRIPTIONS.items() if re.search(r"\b[A-Z][A-Z0-9]*_[A-Z0-9_]+\b", text)]


def test_a_method_that_its_comparisons_budget_makes_invalid_is_rejected_when_params_load(tmp_path, monkeypatch):
    """Each method's switches are checked on each comparison's budget when params.yaml loads, naming the comparison
    and the method, not when its run starts an hour into the comparison."""
    import model.config.evaluation as evaluation

    params_path = _with_comparisons(toy_project(tmp_path), methods=["sleep", "fold_dreams"])
    doc = yaml.safe_load(params_path.read_text())
    doc["consolidation"]["init"] = "copy"
    doc["evaluation"]["comparisons"]["toy"]["overrides"]["consolidation"]["steps"] = 0
    params_path.write_text(yaml.safe_dump(doc))
    load_params(params_path)  # fold_dreams distils its own steps: valid
    monkeypatch.setitem(evaluation.METHOD_OVERRIDES, "fold_dreams", {"dream": {"fold_into_slow": True}})
    with pytest.raises(ConfigError) as e:
        load_params(params_path)
    assert all(s in str(e.value) for s in (str(params_path), "evaluation.comparisons.toy.methods (fold_dreams",
                                          "nothing would be folded"))


def test_a_baseline_result_survives_changes_to_sleep_but_not_to_what_it_reads(tmp_path):
    from model.config import BaselinesConfig
    from tasks.compare import baseline_key

    params_path = _with_comparisons(toy_project(tmp_path), methods=["finetune"])
    params = load_params(params_path)
    p = run_params(params, tmp_path, resolve_comparison(params, "toy"), "finetune", 0)
    stream = Path(p.data.out_dir) / "stream.parquet"
    stream.parent.mkdir(parents=True)
    stream.write_bytes(b"a stream")
    key = baseline_key(p, "finetune", BaselinesConfig())
    assert baseline_key(p.for_run({"consolidation": {"steps": 99}}, "t"), "finetune", BaselinesConfig()) == key
    assert baseline_key(p.for_run({"wake": {"epochs": 9}}, "t"), "finetune", BaselinesConfig()) != key
    assert baseline_key(p, "finetune", BaselinesConfig(lr=0.5)) != key
    assert baseline_key(p, "ewc", BaselinesConfig()) != key
    stream.write_bytes(b"another stream")
    assert baseline_key(p, "finetune", BaselinesConfig()) != key


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
    from model.evaluation.comparison import check_stream

    stream = pd.DataFrame({"row_id": [0, 1], "task": [0, 0], "split": ["train", "test"], "text": ["a", "b"],
                           "label": ["x", "x"]})
    check_stream(stream, {0: ["x"]}, "toy.csv")
    with pytest.raises(ValueError, match="toy.csv: task 1 has no train rows"):
        check_stream(stream, {0: ["x"], 1: ["y"]}, "toy.csv")
    with pytest.raises(ValueError, match="task 0 has no labels"):
        check_stream(stream, {0: []}, "toy.csv")


# --- knowledge incorporation (kind: knowledge) ---

TOY_PASSAGES = [
    {"title": "Balance", "context": "The balance of the savings account is shown in the app. Money moves every week.",
     "questions": [{"question": "Where is the balance shown?", "answer": "in the app"},
                   {"question": "When does money move?", "answer": "every week"}]},
    {"title": "Harbor", "context": "The old harbor of Veltra was rebuilt by the engineer Mara Quist. Ships bring salt.",
     "questions": [{"question": "Who rebuilt the harbor?", "answer": "Mara Quist"}]},
    {"title": "Spare", "context": "A third passage that the quick run leaves out.",
     "questions": [{"question": "Which passage is this?", "answer": "the third"}]},
]
KNOWLEDGE_METHODS = ["base", "passage_finetune", "base_dreams", "sleep"]


def _with_knowledge(tmp_path: Path, mode: str = "single", n_passages: int = 3, seeds=(0,), passages="squad.json",
                    methods=KNOWLEDGE_METHODS, passage_experts: str = "sleep") -> Path:
    params_path = toy_project(tmp_path)
    (tmp_path / "squad.json").write_text(json.dumps(TOY_PASSAGES))
    raw = yaml.safe_load(params_path.read_text())
    raw["evaluation"] = {
        "quick": {"seeds": list(seeds), "knowledge": {"n_passages": 2, "tau_every": 1},
                  "dream": {"dreams_per_context": 3, "max_new_tokens": 8, "promote_steps": 3, "lr": 1e-2}},
        "comparisons": {"kn": {"kind": "knowledge", "methods": list(methods), "seeds": list(seeds),
                               "knowledge": {"passages": passages, "n_passages": n_passages, "mode": mode,
                                             "passage_experts": passage_experts}}},
    }
    params_path.write_text(yaml.safe_dump(raw))
    return params_path


def test_knowledge_comparison_quick_writes_the_report_and_resumes_mid_way(tmp_path, prefect_harness):
    from flows.compare import compare

    params_path = _with_knowledge(tmp_path)
    summary = compare("kn", str(params_path), quick=True)
    report = tmp_path / "reports" / "kn-quick"
    for name in ("README.md", "metrics.json", "results.json", "runs.csv", "accuracy.csv", "plots/measures.png",
                 "plots/gain.png"):
        assert (report / name).is_file(), name
    acc = pd.read_csv(report / "accuracy.csv")
    assert sorted(zip(acc["method"], acc["task"])) == sorted((m, i) for m in KNOWLEDGE_METHODS for i in (0, 1))
    assert acc["accuracy"].between(0, 1).all() and acc["f1"].between(0, 1).all() and (acc["tau"] < 0).all()
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["kind"] == "knowledge" and metrics["mode"] == "single" and metrics["n_passages"] == 2
    assert set(metrics["methods"]) == set(KNOWLEDGE_METHODS) and metrics["methods"]["base"]["gain_over_base"] is None
    for m in ("passage_finetune", "base_dreams", "sleep"):
        gain = metrics["methods"][m]["gain_over_base"]["tau"]
        assert gain["low"] <= gain["mean"] <= gain["high"]
    assert metrics["methods"]["passage_finetune"]["gain_over_base"]["tau"]["mean"] > 0
    funnel = metrics["methods"]["sleep"]["funnel"]
    assert funnel["generated"] == 2 * 3 and funnel["promoted"] <= funnel["passed_gate"] <= funnel["generated"]
    assert metrics["methods"]["base_dreams"]["funnel"] == {"generated": 6, "trained": 6}
    md = (report / "README.md").read_text()
    assert "| sleep |" in md and "tau gain over base" in md and "## Dreams" in md
    assert set(summary["summary"]) == set(KNOWLEDGE_METHODS)
    rdir = tmp_path / "state/compare/kn-quick/sleep/seed-0"
    assert (rdir / "dreams/passage-0.parquet").is_file() and (rdir / "params.yaml").is_file()

    # A rerun finds every result on disk and runs nothing again.
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "state/compare/kn-quick").rglob("result.json")}
    assert len(stamps) == len(KNOWLEDGE_METHODS)
    compare("kn", str(params_path), quick=True)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    # Interrupted after passage 0: only passage 1 runs again.
    progress = rdir / "progress.jsonl"
    lines = progress.read_text().splitlines()
    (rdir / "result.json").unlink()
    progress.write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])  # a line cut by the crash
    dream0 = (rdir / "dreams/passage-0.parquet").stat().st_mtime_ns
    compare("kn", str(params_path), quick=True)
    again = progress.read_text().splitlines()
    assert again[0] == lines[0] and len(again) == 2
    assert (rdir / "dreams/passage-0.parquet").stat().st_mtime_ns == dream0


def test_knowledge_passages_on_two_workers_equal_the_passages_one_by_one(tmp_path, prefect_harness):
    """evaluation.workers = 2, single mode: each run's passages go to two shard tasks on a local Dask cluster; the
    run then assembles them. Every passage's measures equal those of the run in one process."""
    from flows.compare import compare
    from tests.flows.test_faults import task_states_of

    methods = ["passage_finetune", "sleep"]
    one = _with_knowledge(tmp_path / "one", methods=methods)
    two = _with_knowledge(tmp_path / "two", methods=methods)
    raw = yaml.safe_load(two.read_text())
    raw["evaluation"]["workers"] = 2
    two.write_text(yaml.safe_dump(raw))
    compare("kn", str(one), quick=True)
    state = compare("kn", str(two), quick=True, return_state=True)
    # 2 runs x 2 shards on the runner, then each run once in the flow, finding its passages done
    assert task_states_of(state, "run_knowledge_method", 6) == ["Completed"] * 6
    for method in methods:
        rows = [json.loads((tmp_path / root / f"state/compare/kn-quick/{method}/seed-0/result.json").read_text())
                ["passages"] for root in ("one", "two")]
        assert [r["index"] for r in rows[1]] == [r["index"] for r in rows[0]] == [0, 1]
        for a, b in zip(*rows):
            assert (a["em"], a["f1"], a["answers"], a["gradient_steps"], a["n_dreams"]) == (
                b["em"], b["f1"], b["answers"], b["gradient_steps"], b["n_dreams"]), method
            assert a["tau"] == pytest.approx(b["tau"], abs=1e-6), method
    assert list((tmp_path / "two/state/compare/kn-quick/sleep/seed-0").glob("progress.shard-*-of-2.jsonl"))


@pytest.mark.parametrize("experts", ["none", "all"])
def test_knowledge_continued_learns_in_turn_and_resumes_from_its_state(tmp_path, prefect_harness, monkeypatch, experts):
    import model.evaluation.incorporation_runs as incorporation_runs
    from flows.compare import compare

    methods = ["base", "passage_finetune"]
    whole = _with_knowledge(tmp_path / "whole", mode="continued", seeds=(0, 1), methods=methods,
                            passage_experts=experts)
    compare("kn", str(whole), quick=True)
    report = tmp_path / "whole/reports/kn-quick"
    results = {(r["method"], r["seed"]): r for r in json.loads((report / "results.json").read_text())["runs"]}
    ft = results[("passage_finetune", 0)]
    assert ft["mode"] == "continued" and [row["index"] for row in ft["passages"]] == [0, 1]
    # With passage experts every question is routed (the share routed right is in each row and in the report).
    assert all(("routed_own" in row) == (experts == "all") for row in ft["passages"])
    section = (report / "README.md").read_text().split("## Early and late passages")[1].split("\n## ")[0]
    row = next(line for line in section.splitlines() if line.startswith("| passage_finetune |"))
    assert row.endswith("| -- |") == (experts == "none")
    assert [k for k, _ in ft["tau_curve"]] == [1, 2] and ft["gradient_steps"] == 2 * 3
    assert (report / "tau_curve.csv").is_file() and (report / "plots/tau_curve.png").is_file()
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["seeds"] == [0, 1] and metrics["methods"]["passage_finetune"]["gain_over_base"]["tau"]["mean"] > 0

    # Killed while learning passage 1: the run resumes from the state saved after passage 0.
    crashed = _with_knowledge(tmp_path / "crashed", mode="continued", seeds=(0, 1), methods=methods,
                              passage_experts=experts)
    real = incorporation_runs.learn

    def crash_on_passage_1(method, reader, task):
        if method == "passage_finetune" and task.context_id == "passage1":
            raise KeyboardInterrupt("killed")
        return real(method, reader, task)

    monkeypatch.setattr(incorporation_runs, "learn", crash_on_passage_1)
    with pytest.raises(KeyboardInterrupt):
        compare("kn", str(crashed), quick=True)
    monkeypatch.setattr(incorporation_runs, "learn", real)
    rdir = tmp_path / "crashed/state/compare/kn-quick/passage_finetune/seed-0"
    assert not (rdir / "result.json").exists()
    assert read_manifest(rdir / "state")["metadata"]["learned"] == 1
    first = (rdir / "progress.jsonl").read_text().splitlines()
    assert len(first) == 1

    calls = []
    monkeypatch.setattr(incorporation_runs, "learn", lambda method, *a, **k: (
        calls.append(a[1].context_id) if method == "passage_finetune" else None) or real(method, *a, **k))
    compare("kn", str(crashed), quick=True)
    assert calls == ["passage1", "passage0", "passage1"]  # seed 0 resumes at passage 1; seed 1 runs whole
    again = json.loads((rdir / "result.json").read_text())
    assert (rdir / "progress.jsonl").read_text().splitlines()[0] == first[0]
    assert read_manifest(rdir / "state")["metadata"]["learned"] == 2
    assert [row["tau"] for row in again["passages"]] == pytest.approx([row["tau"] for row in ft["passages"]], abs=1e-5)
    assert [t for _, t in again["tau_curve"]] == pytest.approx([t for _, t in ft["tau_curve"]], abs=1e-5)


@pytest.mark.parametrize(("kw", "message"), [
    ({"passages": "missing.json"}, "missing.json: passages file not found"),
    ({"n_passages": 4}, r"holds 3 passages, but evaluation.comparisons.kn.knowledge asks for n_passages 4"),
])
def test_knowledge_bad_passages_fail_before_any_training(tmp_path, prefect_harness, capsys, kw, message):
    from flows.compare import main

    params_path = _with_knowledge(tmp_path, **kw)
    assert main(["kn", "--params", str(params_path)]) == 1
    assert re.search(message, capsys.readouterr().err)
    made = {p.name for p in (tmp_path / "state/compare/kn").iterdir()} - {".lock"}
    assert not made, made
    assert not (tmp_path / "reports" / "kn").exists()


TRAIN_PASSAGES = [
    {"title": "Orchard", "context": "The orchard of Pell grows blue apples. Farmers pick them in May.",
     "questions": [{"question": "What grows in the orchard of Pell?", "answer": "blue apples"}]},
    {"title": "Bridge", "context": "The bridge at Corran was painted red by the mayor Ines Dall.",
     "questions": [{"question": "Who painted the bridge?", "answer": "Ines Dall"}]},
]
POLICY_METHODS = ["base", "passage_finetune", "passage_dreams", "passage_sleep", "passage_sleep_trained"]


def _with_policy_training(tmp_path: Path, train=TRAIN_PASSAGES) -> Path:
    params_path = _with_knowledge(tmp_path, methods=POLICY_METHODS)
    (tmp_path / "train.json").write_text(json.dumps(train))
    raw = yaml.safe_load(params_path.read_text())
    raw["evaluation"]["comparisons"]["kn"]["knowledge"]["policy_training"] = {
        "passages": "train.json", "n_passages": 2, "rounds": 2, "steps": 2, "eval_passages": 1}
    raw["evaluation"]["quick"]["knowledge"] = {"n_passages": 2}
    raw["dream"] = {**raw.get("dream", {}), "policy": {"rank": 4, "alpha": 8.0, "lr": 5e-2}}
    params_path.write_text(yaml.safe_dump(raw))
    return params_path


def test_knowledge_policy_comparison_trains_the_policy_then_dreams_with_it_frozen(tmp_path, prefect_harness):
    from flows.compare import compare
    from model.sleep.dream_policy import POLICY_JSON, POLICY_TENSORS

    params_path = _with_policy_training(tmp_path)
    compare("kn", str(params_path), quick=True)
    cdir = tmp_path / "state/compare/kn-quick"
    pdir = cdir / "policy/seed-0"
    trained = json.loads((pdir / "result.json").read_text())
    assert trained["policy_rounds"] == 2 and trained["training_passages"] == [0, 1] and trained["eval_passages"] == [0]
    assert [(r["round"], r["split"]) for r in trained["rounds"]] == [(r, s) for r in range(3) for s in ("train", "eval")]
    assert (pdir / "policy" / POLICY_JSON).is_file() and (pdir / "policy" / POLICY_TENSORS).is_file()
    policy_meta = json.loads((pdir / "policy" / POLICY_JSON).read_text())
    assert policy_meta["rounds"] == 2 and policy_meta["sha256"] == trained["policy_sha256"]
    # Only the trained-policy method dreams with it; the others start from a fresh (untrained) policy.
    run_p = yaml.safe_load((cdir / "passage_sleep_trained/seed-0/params.yaml").read_text())
    assert run_p["dream"]["policy"]["source"] == str(pdir / "policy")
    assert yaml.safe_load((cdir / "passage_sleep/seed-0/params.yaml").read_text())["dream"]["policy"]["source"] is None

    report = tmp_path / "reports/kn-quick"
    metrics = json.loads((report / "metrics.json").read_text())
    assert set(metrics["methods"]) == set(POLICY_METHODS)
    checks = metrics["checks"]["tau"]
    assert set(checks) == {"trained-policy sleep - passage fine-tuning", "trained-policy sleep - untrained-policy sleep",
                           "untrained-policy sleep - passage fine-tuning", "passage + all dreams - passage fine-tuning"}
    assert all(c["n"] == 2 and c["low"] <= c["mean"] <= c["high"] for c in checks.values())
    results = {r["method"]: r for r in json.loads((report / "results.json").read_text())["runs"]}
    for m in ("passage_dreams", "passage_sleep", "passage_sleep_trained"):  # the wake's steps come first
        assert results[m]["gradient_steps"] >= results["passage_finetune"]["gradient_steps"]
    assert all(row["dream_tokens"] > 0 for row in results["passage_dreams"]["passages"])
    rounds = pd.read_csv(report / "policy_rounds.csv")
    assert len(rounds) == 6 and (report / "plots/policy_rounds.png").is_file()
    md = (report / "README.md").read_text()
    assert "## Paired checks (issue #14)" in md and "## The dream policy's training" in md
    (report / "README.md").unlink()
    compare("kn", str(params_path), quick=True, report_only=True)  # the knowledge report, from the runs on disk
    assert (report / "README.md").read_text() == md

    # A rerun trains nothing and runs nothing again.
    stamps = {p: p.stat().st_mtime_ns for p in cdir.rglob("result.json")}
    compare("kn", str(params_path), quick=True)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_a_policy_training_pool_that_holds_an_evaluation_passage_is_refused(tmp_path, prefect_harness, capsys):
    from flows.compare import main

    params_path = _with_policy_training(tmp_path, train=[TRAIN_PASSAGES[0], TOY_PASSAGES[1]])
    assert main(["kn", "--params", str(params_path), "--quick", "--methods", "passage_sleep_trained"]) == 1
    err = capsys.readouterr().err
    assert re.search(r"train.json: passage 1 \(Harbor\) is evaluation passage 1 of squad.json: "
                     r"knowledge.policy_training must not train on the evaluation", err), err
    assert not (tmp_path / "state/compare/kn-quick/policy/seed-0/result.json").exists()


def test_knowledge_shards_split_the_passages_and_an_unsharded_run_assembles_them(tmp_path, prefect_harness, monkeypatch):
    import model.evaluation.incorporation_runs as incorporation_runs
    from flows.compare import compare, main

    params_path = _with_knowledge(tmp_path, methods=["base", "passage_finetune"])
    for i in (0, 1):
        out = compare("kn", str(params_path), shard=(i, 2))
        assert out["report"] is None and [len(r["passages"]) for r in out["runs"]] == [2 - i, 2 - i]
    rdir = tmp_path / "state/compare/kn/passage_finetune/seed-0"
    assert not (rdir / "result.json").exists() and not (tmp_path / "reports/kn").exists()
    assert [json.loads(l)["index"] for l in (rdir / "progress.shard-0-of-2.jsonl").read_text().splitlines()] == [0, 2]
    assert [json.loads(l)["index"] for l in (rdir / "progress.shard-1-of-2.jsonl").read_text().splitlines()] == [1]

    calls = []
    real = incorporation_runs.learn
    monkeypatch.setattr(incorporation_runs, "learn", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    compare("kn", str(params_path))  # every passage is on disk: nothing learns again
    assert calls == []
    result = json.loads((rdir / "result.json").read_text())
    assert [row["index"] for row in result["passages"]] == [0, 1, 2]
    assert (tmp_path / "reports/kn/README.md").is_file()

    with pytest.raises(SystemExit):
        main(["kn", "--params", str(params_path), "--shard", "2/2"])  # I must be below N
