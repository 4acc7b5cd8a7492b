"""The long-context report (reporting/long_context.py): means, paired targets, files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from model.config import load_params
from reporting.long_context import METHODS, summarise_long_context, target_checks, write_long_context_report

ROOT = Path(__file__).resolve().parents[2]
SEEDS = [0, 1]
LENGTHS = [1024, 4096, 65536]
ITEMS = (("qa1", "qa1_single.txt:1", 4), ("qa1", "qa1_single.txt:2", 4), ("qa2", "qa2_two.txt:1", 5))


def right(method: str, seed: int, item: int, length: int) -> bool:
    """Built so that: sleep_1 beats cms clearly, sleep_2 does not (too few documents apart), sleep_1 loses one
    document at 64k (drop 1/6), in_context is right only while the facts fit its window (1k), the facts alone
    answer every document."""
    return {"facts_only": True,
            "in_context": length == 1024,
            "retrieval": item != 2,
            "finetune": item == 0 and seed == 0,
            "cms": item == 0 and seed == 0,
            "sleep_1": not (seed == 1 and item == 2 and length == 65536),
            "sleep_2": item != 1,
            "sleep_3": True}[method]


def make_results() -> list[dict]:
    results = []
    for m in METHODS:
        for s in SEEDS:
            docs = [{"task": task, "item_id": item_id, "length": L, "n_tokens": L - 16, "correct": right(m, s, i, L),
                     "chosen": "x", "answer": "x", "n_candidates": n, "facts_in_window": L == 1024,
                     "gradient_steps": 0 if m in ("facts_only", "in_context", "retrieval") else L // 512,
                     "sleeps": int(m[-1]) if m.startswith("sleep_") else 0, "seconds": 1.0}
                    for L in LENGTHS if not (m == "sleep_3" and L == 65536)  # sleep_3 lacks a length
                    for i, (task, item_id, n) in enumerate(ITEMS)]
            results.append({"method": m, "seed": s, "key": f"{m}-{s}", "kind": "long_context", "seconds": 30.0,
                            "gradient_steps": sum(d["gradient_steps"] for d in docs), "documents": docs})
    return results


def test_summary_means_are_pooled_over_documents_and_seeds():
    summary = summarise_long_context(make_results(), list(reversed(METHODS)), SEEDS)
    assert list(summary) == list(METHODS)  # report order, whatever the comparison's order
    s1 = summary["sleep_1"]
    assert s1["by_length"]["4096"]["mean"] == pytest.approx(1.0)
    assert s1["by_length"]["65536"]["mean"] == pytest.approx(5 / 6)
    assert s1["accuracy"]["mean"] == pytest.approx(17 / 18)
    assert summary["cms"]["by_length"]["1024"]["mean"] == pytest.approx(1 / 6)
    assert summary["in_context"]["by_length"]["1024"]["mean"] == pytest.approx(1.0)
    assert summary["in_context"]["by_length"]["4096"]["mean"] == pytest.approx(0.0)
    assert summary["retrieval"]["by_task"] == {"qa1": pytest.approx({"mean": 1.0, "low": 1.0, "high": 1.0}),
                                               "qa2": pytest.approx({"mean": 0.0, "low": 0.0, "high": 0.0})}
    assert "65536" not in summary["sleep_3"]["by_length"] and summary["sleep_3"]["documents"] == 12
    assert summary["sleep_2"]["sleeps_per_document"] == 2
    assert summary["finetune"]["minutes"] == pytest.approx(1.0)  # 2 runs x 30 s


def test_targets_pair_by_document_and_say_what_is_missing():
    t = target_checks(make_results(), SEEDS, LENGTHS)
    vs = {(c["a"], c["b"], c["length"]): c for c in t["versus_reading"]}
    # sleep_1 - cms at 4k: differences [0, 1, 1, 1, 1, 1], t(5) interval [0.405, 1.262].
    c = vs[("sleep_1", "cms", 4096)]
    assert c["n"] == 6 and c["mean"] == pytest.approx(5 / 6) and c["low"] == pytest.approx(0.4048, abs=1e-3)
    assert c["above_zero"]
    assert vs[("sleep_1", "cms", 65536)]["above_zero"]
    # sleep_2 - cms at 4k: [0, 0, 1, 1, 0, 1]: mean 1/2, interval reaches below zero.
    assert vs[("sleep_2", "cms", 4096)]["mean"] == pytest.approx(0.5) and not vs[("sleep_2", "cms", 4096)]["above_zero"]
    assert vs[("sleep_3", "cms", 65536)]["missing"] == "sleep_3 has no documents at 65536 tokens"
    assert 1024 not in {c["length"] for c in t["versus_reading"]}
    ic = {c["a"]: c for c in t["versus_in_context"]}
    assert ic["sleep_1"]["n"] == 12 and ic["sleep_1"]["mean"] == pytest.approx(11 / 12) and ic["sleep_1"]["above_zero"]
    drop = {d["method"]: d for d in t["drop"]}
    assert drop["sleep_1"]["drop"] == pytest.approx(1 / 6) and not drop["sleep_1"]["met"]
    assert drop["sleep_2"]["drop"] == pytest.approx(0.0) and drop["sleep_2"]["met"]
    assert drop["sleep_3"]["missing"] and drop["sleep_3"]["drop"] is None
    more = t["more_levels"]
    assert more["differences"]["sleep_3"]["n"] == 12 and more["differences"]["sleep_3"]["mean"] == pytest.approx(0.0)
    assert more["differences"]["sleep_2"]["mean"] == pytest.approx(12 / 18 - 17 / 18)
    assert not more["help"]


def test_targets_without_cms_or_long_lengths_are_not_errors():
    results = [r for r in make_results() if r["method"] != "cms"]
    t = target_checks(results, SEEDS, [1024])
    assert t["versus_reading"] == [] and all(d["missing"] for d in t["drop"])
    t = target_checks(results, SEEDS, LENGTHS)
    assert {c["missing"] for c in t["versus_reading"] if c["b"] == "cms"} >= {"cms is not in the comparison"}
    t = target_checks([r for r in results if not r["method"].startswith("sleep")], SEEDS, LENGTHS)
    assert t["missing"] == "no sleep method in the comparison"


def test_report_files(tmp_path, capsys):
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    params = load_params(tmp_path / "params.yaml")
    results = make_results()
    comp = SimpleNamespace(name="babilong", quick=True, description="Facts hidden in long documents.",
                           methods=list(METHODS), seeds=SEEDS,
                           long_context=SimpleNamespace(lengths=LENGTHS, window=1024))
    out = write_long_context_report(params, tmp_path, comp, results)
    report = tmp_path / params.evaluation.reports_dir / "babilong-quick"
    assert out["report"] == str(report / "README.md")
    for f in ("README.md", "metrics.json", "results.json", "runs.csv", "accuracy.csv", "plots/accuracy_by_length.png"):
        assert (report / f).is_file(), f
    json.dumps(out)  # the flow logs it
    readme = (report / "README.md").read_text()
    assert readme.startswith("# Comparison `babilong-quick`") and f"`{params.model.source}`" in readme
    assert "Chance (mean of 1 / candidates): 0.233." in readme  # (1/4 + 1/4 + 1/5) / 3
    assert "| sleep_3 | 1.000 [1.000, 1.000] | 1.000 [1.000, 1.000] | – |" in readme
    assert "| sleep_1 | 1.000 [1.000, 1.000] | 1.000 [1.000, 1.000] | 0.833 [" in readme
    lines = readme.splitlines()
    line = next(x for x in lines if x.startswith("- sleep_1 − cms at 4k"))
    assert line.endswith("interval above zero: yes")
    assert next(x for x in lines if x.startswith("- sleep_2 − cms at 4k")).endswith("interval above zero: **no**")
    assert "- sleep_1: 1.000 − 0.833 = +0.167; less than 0.10: **no**" in readme
    assert "- sleep_3: not checked, sleep_3 has no documents at 65536 tokens." in readme
    assert "- more levels help: no" in readme
    acc = pd.read_csv(report / "accuracy.csv")
    assert len(acc) == sum(len(r["documents"]) for r in results) == 7 * 2 * 9 + 2 * 6  # sleep_3 lacks 64k
    assert acc.groupby(["method", "seed", "task", "item_id", "length"]).size().max() == 1
    assert acc[(acc.method == "sleep_1") & (acc.length == 65536)]["correct"].mean() == pytest.approx(5 / 6)
    runs = pd.read_csv(report / "runs.csv")
    assert list(runs.columns[:6]) == ["method", "seed", "accuracy", "documents", "gradient_steps", "seconds"]
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["methods"]["cms"]["by_length"]["4096"]["mean"] == pytest.approx(1 / 6)
    assert metrics["targets"]["drop"][0]["drop"] == pytest.approx(1 / 6)
    assert json.loads((report / "results.json").read_text())["runs"] == results
    with capsys.disabled():
        print("\n" + "\n".join(lines[:14] + ["..."] + lines[lines.index("## Targets"):lines.index("## Cost") + 6]))
