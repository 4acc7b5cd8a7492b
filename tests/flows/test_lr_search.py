"""`lm-sleep lr-search`: the same learning-rate grid for every method, on development labels only."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from model.config import ConfigError, load_params
from model.evaluation.comparison import evaluation_labels
from tasks.compare import method_baselines, resolve_comparison, run_params
from tasks.lr_search import choose, search_comparisons, search_params
from tests.flows.test_compare import _with_comparisons
from tests.flows.test_lifecycle_flow import toy_project

EXTRA = {"timer": "timer", "recipe": "cook", "flight": "plane", "joke": "funny"}


def _dev_project(tmp_path: Path, grid=(1e-3, 5e-2), methods=("finetune", "cms"), extra_labels=True) -> Path:
    """The toy project (its comparison draws 4 intents per seed) with 4 more intents, so 4 are left for development."""
    params_path = _with_comparisons(toy_project(tmp_path), seeds=(0,),
                                    lr_search={"comparison": "toy", "grid": list(grid), "methods": list(methods)})
    if extra_labels:
        csv = tmp_path / "toy.csv"
        rows = [{"utterance": f"please {w} {w} now {i}", "intent": lab} for lab, w in EXTRA.items() for i in range(12)]
        pd.concat([pd.read_csv(csv), pd.DataFrame(rows)]).to_csv(csv, index=False)
    return params_path


def test_each_grid_value_is_a_dev_comparison_that_sets_the_method_rate(tmp_path):
    params_path = _dev_project(tmp_path)
    params = load_params(params_path)
    n_excluded, grid = search_comparisons(search_params(params), tmp_path)
    assert n_excluded == 4
    assert [lr for lr, _ in grid] == [1e-3, 5e-2]
    evaluation = evaluation_labels(params, tmp_path)
    assert len(evaluation) == 4  # the toy comparison's one seed: 2 tasks x 2 intents of the 8
    for lr, comp in grid:
        p = run_params(params, tmp_path, comp, "cms", 0)
        assert p.cms.levels[0].lr == pytest.approx(lr)
        assert p.cms.levels[1].lr == pytest.approx(lr * 0.02 / 0.05)  # the slow level keeps its ratio
        assert evaluation <= set(p.data.source.exclude_labels)
        assert p.wake.epochs == 3  # the named comparison's budget


def test_evaluation_lrs_give_a_method_its_own_rate(tmp_path):
    params_path = _with_comparisons(toy_project(tmp_path), lrs={"cms": 0.01, "ewc": 0.002})
    params = load_params(params_path)
    comp = resolve_comparison(params, "toy")
    assert run_params(params, tmp_path, comp, "cms", 0).cms.levels[0].lr == pytest.approx(0.01)
    assert run_params(params, tmp_path, comp, "sleep", 0).cms.levels[0].lr == pytest.approx(0.05)  # params' own
    assert method_baselines(params, "ewc").lr == 0.002 and method_baselines(params, "finetune").lr == 5e-3
    # The search ignores them: every method takes the grid's value.
    assert search_params(params).evaluation.lrs == {}


@pytest.mark.parametrize(("lr_search", "lrs", "message"), [
    ({"methods": ["zero_shot"]}, {}, "zero_shot: no learning rate to search"),
    ({"grid": [1e-3]}, {}, "at least 2"),
    ({"grid": [1e-3, 2.0]}, {}, "in \\(0, 1\\]"),
    ({}, {"icl": 1e-3}, "icl: no learning rate to set"),
    ({}, {"ewc": 0.0}, "in \\(0, 1\\]"),
])
def test_bad_search_settings_are_config_errors(tmp_path, lr_search, lrs, message):
    params_path = _with_comparisons(toy_project(tmp_path), lr_search=lr_search, lrs=lrs)
    with pytest.raises(ConfigError, match=message):
        load_params(params_path)


def test_the_named_comparison_must_be_continual(tmp_path):
    params_path = _with_comparisons(toy_project(tmp_path), lr_search={"comparison": "nope"})
    with pytest.raises(ConfigError, match="'nope' is not a continual comparison.*continual: toy"):
        search_comparisons(load_params(params_path), tmp_path)


def test_choice_is_the_best_final_accuracy_and_the_smaller_rate_on_ties():
    rows = [{"method": "a", "lr": 0.1, "final_accuracy": 0.5}, {"method": "a", "lr": 0.01, "final_accuracy": 0.5},
            {"method": "b", "lr": 0.01, "final_accuracy": 0.2}, {"method": "b", "lr": 0.1, "final_accuracy": 0.7}]
    assert choose(rows) == {"a": 0.01, "b": 0.1}


@pytest.mark.slow
def test_search_runs_every_method_and_rate_on_dev_labels_writes_the_report_and_resumes(tmp_path, prefect_harness):
    from flows.lr_search import lr_search

    params_path = _dev_project(tmp_path)
    summary = lr_search(str(params_path))
    report = tmp_path / "reports" / "lr-search"
    for name in ("README.md", "results.json", "plots/lr_search.png"):
        assert (report / name).is_file(), name
    res = json.loads((report / "results.json").read_text())
    evaluation = evaluation_labels(load_params(params_path), tmp_path)
    assert set(summary["chosen"]) == {"finetune", "cms"} and set(summary["chosen"].values()) <= {1e-3, 5e-2}
    assert summary["now"] == {"finetune": 5e-3, "cms": 0.05}
    assert sorted((r["method"], r["lr"]) for r in res["rows"]) == [
        (m, lr) for m in ("cms", "finetune") for lr in (1e-3, 5e-2)]
    # Every run read development labels only, and the rate changed what it learned.
    for lr in (1e-3, 5e-2):
        plan = json.loads((tmp_path / f"state/compare/lr-search/lr-{lr:g}/data/seed-0/processed/tasks.json").read_text())
        dev = {lab for labels in plan.values() for lab in labels}
        assert len(dev) == 4 and not dev & evaluation
        p = load_params(tmp_path / f"state/compare/lr-search/lr-{lr:g}/cms/seed-0/params.yaml")
        assert p.cms.levels[0].lr == pytest.approx(lr)
    finetune = [r for r in res["runs"] if r["method"] == "finetune"]
    assert len(finetune) == 2 and finetune[0]["losses"][0][-1] != finetune[1]["losses"][0][-1]
    assert all(0 <= r["final_accuracy"] <= 1 for r in res["rows"])
    readme = (report / "README.md").read_text()
    assert "| finetune |" in readme and "| cms |" in readme and "lr 0.05" in readme

    # Resume: nothing runs again.
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "state/compare/lr-search").rglob("result.json")}
    assert len(stamps) == 4
    lr_search(str(params_path))
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


@pytest.mark.slow
def test_no_labels_left_for_development_is_a_clear_error(tmp_path, prefect_harness, capsys):
    from flows.cli import main

    params_path = _dev_project(tmp_path, extra_labels=False)  # the comparison uses every intent of the file
    assert main(["lr-search", "--params", str(params_path)]) == 1
    err = capsys.readouterr().err
    assert "development stream" in err and "toy.csv" in err
    assert not (tmp_path / "reports" / "lr-search").exists()


def test_every_subcommand_answers_help_with_its_own_options(capsys):
    from flows.cli import DELEGATED, build_parser, main

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    names = sorted(sub.choices)
    assert set(DELEGATED) <= set(names) and {"ingest", "cycle", "rebuild", "predict", "lr-search", "paired"} <= set(names)
    for name in names:
        with pytest.raises(SystemExit) as exc:
            main([name, "-h"])
        assert exc.value.code == 0, name
        out = capsys.readouterr().out
        assert f"usage: lm-sleep {name}" in out, (name, out[:80])
        assert "-h, --help" in out, name


def test_a_comparison_on_development_tasks_never_sees_an_evaluation_label(tmp_path):
    from model.data.stream import build_stream, load_source
    from tasks.compare import development_comparison, seed_params

    params_path = _dev_project(tmp_path)
    params = load_params(params_path)
    comp = resolve_comparison(params, "toy", methods=["sleep"])
    dev = development_comparison(params, tmp_path, comp)
    assert (dev.name, dev.methods, dev.seeds) == ("toy-dev", ("sleep",), comp.seeds)
    assert "4 evaluation labels excluded" in dev.description
    evaluation = evaluation_labels(params, tmp_path)
    p = seed_params(params, tmp_path, dev, 0)
    _, plan = build_stream(load_source(p.data.source, tmp_path), p.data)
    every = set(pd.read_csv(tmp_path / "toy.csv")["intent"])
    assert {lab for labels in plan.values() for lab in labels} == every - evaluation  # the 4 intents left over
    assert len(every - evaluation) == 4 and run_params(params, tmp_path, dev, "sleep", 0).wake.epochs == 3


def test_compare_dev_and_seeds_reach_the_flow(tmp_path, prefect_harness, capsys):
    from flows.compare import main

    params_path = _dev_project(tmp_path)
    assert main(["toy", "--params", str(params_path), "--dev", "--seeds", "0", "--report-only"]) == 1
    assert "toy-dev" in capsys.readouterr().err  # no finished run under the development comparison's directory
    with pytest.raises(SystemExit):
        main(["toy", "--params", str(params_path), "--seeds", "-1"])
