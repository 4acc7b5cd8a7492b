"""`lm-sleep compare` on a long-context comparison (issue #16): a quick run on the tiny model, resume, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.flows.test_lifecycle_flow import toy_project

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
METHODS = ["facts_only", "in_context", "retrieval", "finetune", "cms", "sleep_1", "sleep_2", "sleep_3"]
PROSE = [{"title": f"T{i}", "context": " ".join(f"The weather in town {i} was fine on day {j}." for j in range(12)),
          "questions": [{"question": "What?", "answer": "fine"}]} for i in range(6)]


def _with_long_context(tmp_path: Path, babi_dir: str | None = None, distractors: str = "prose.json",
                       lengths=(320, 640)) -> Path:
    params_path = toy_project(tmp_path)
    (tmp_path / "prose.json").write_text(json.dumps(PROSE))
    raw = yaml.safe_load(params_path.read_text())
    raw["consolidation"].update({"steps": 2, "prompt_buffer_size": 4, "max_new_tokens": 4})
    raw["evaluation"] = {
        "quick": {"seeds": [0], "long_context": {"items_per_task": 1, "lengths": list(lengths)}},
        "comparisons": {"lc": {"kind": "long_context", "methods": METHODS, "seeds": [0, 1],
                               "long_context": {"babi_dir": babi_dir or str(REPO / "data/raw/babi"),
                                                "tasks": ["qa1", "needle"], "needle_keys": 3,
                                                "distractors": distractors, "lengths": [1024], "window": 64,
                                                "sleep_every": 2, "prompt_tokens": 16}}},
    }
    params_path.write_text(yaml.safe_dump(raw))
    return params_path


def test_long_context_quick_runs_every_method_writes_the_report_and_resumes(tmp_path, prefect_harness):
    from flows.compare import compare

    params_path = _with_long_context(tmp_path)
    summary = compare("lc", str(params_path), quick=True)
    report = tmp_path / "reports" / "lc-quick"
    for name in ("README.md", "metrics.json", "results.json", "runs.csv", "accuracy.csv",
                 "plots/accuracy_by_length.png"):
        assert (report / name).is_file(), name
    runs = {r["method"]: r for r in json.loads((report / "results.json").read_text())["runs"]}
    assert set(runs) == set(METHODS) and set(summary["summary"]) == set(METHODS)
    for method, r in runs.items():
        docs = r["documents"]  # 2 tasks x 1 item x 2 lengths
        assert sorted((d["task"], d["length"]) for d in docs) == [("needle", 320), ("needle", 640), ("qa1", 320),
                                                                   ("qa1", 640)]
        assert {d["task"]: d["n_candidates"] for d in docs} == {"qa1": 6, "needle": 3}
        assert all(d["correct"] == (d["chosen"] == d["answer"]) and d["n_tokens"] <= d["length"] for d in docs)
    # The same reading budget: one step per piece for every method that reads (sleeps add their own steps).
    steps = {m: [d["gradient_steps"] for d in runs[m]["documents"]] for m in METHODS}
    assert steps["facts_only"] == steps["in_context"] == steps["retrieval"] == [0, 0, 0, 0]
    assert steps["finetune"] == steps["cms"] and min(steps["cms"]) >= 2
    assert all(s > c for s, c in zip(steps["sleep_1"], steps["cms"]))
    assert all(d["sleeps"] == 0 for d in runs["cms"]["documents"])
    sleeps = {m: sum(d["sleeps"] for d in runs[m]["documents"]) for m in ("sleep_1", "sleep_2", "sleep_3")}
    assert 0 < sleeps["sleep_1"] < sleeps["sleep_2"] <= sleeps["sleep_3"]  # more levels, more consolidations
    acc = pd.read_csv(report / "accuracy.csv")
    assert len(acc) == len(METHODS) * 4 and acc["correct"].isin([True, False]).all()

    # A rerun finds every result on disk and runs nothing again.
    work = tmp_path / "state/compare/lc-quick"
    stamps = {p: p.stat().st_mtime_ns for p in work.rglob("result.json")}
    assert len(stamps) == len(METHODS)
    compare("lc", str(params_path), quick=True)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    # Interrupted after two documents (the third line cut by the crash): only the last two are read again.
    rdir = work / "sleep_1/seed-0"
    lines = (rdir / "progress.jsonl").read_text().splitlines()
    (rdir / "result.json").unlink()
    (rdir / "progress.jsonl").write_text(lines[0] + "\n" + lines[1] + "\n" + lines[2][: len(lines[2]) // 2])
    # A report over the runs so far shows the unfinished one with the documents it has read.
    compare("lc", str(params_path), quick=True, report_only=True)
    partial = {r["method"]: r for r in json.loads((report / "results.json").read_text())["runs"]}["sleep_1"]
    assert partial["partial"] and [d["doc"] for d in partial["documents"]] == [json.loads(x)["doc"] for x in lines[:2]]
    assert "- sleep_1, seed 0: accuracy" in (report / "README.md").read_text() and "**unfinished**" in (
        report / "README.md").read_text()
    compare("lc", str(params_path), quick=True)
    again = (rdir / "progress.jsonl").read_text().splitlines()
    assert again[:2] == lines[:2] and len(again) == 4
    assert [json.loads(x)["doc"] for x in again] == [json.loads(x)["doc"] for x in lines]


def test_long_context_bad_input_is_a_clear_error_naming_the_file(tmp_path, capsys, prefect_harness):
    from flows.compare import main

    # A story with no question.
    babi = tmp_path / "babi"
    babi.mkdir()
    shutil.copy(REPO / "data/raw/babi/qa1_single-supporting-fact_test.txt", babi)
    with open(babi / "qa1_single-supporting-fact_test.txt", "a") as f:
        f.write("1 Mary went to the garden.\n2 John went to the office.\n")
    params_path = _with_long_context(tmp_path / "a", babi_dir=str(babi))
    assert main(["lc", "--params", str(params_path), "--quick"]) == 1
    err = capsys.readouterr().err
    assert "qa1_single-supporting-fact_test.txt: the story starting at line 3001 has no question" in err

    # A requested length shorter than the story.
    params_path = _with_long_context(tmp_path / "b", lengths=(64,))
    assert main(["lc", "--params", str(params_path), "--quick"]) == 1
    err = capsys.readouterr().err
    assert "qa1_single-supporting-fact_test.txt" in err and "length 64 tokens is shorter than the facts" in err

    # An empty distractor source.
    (tmp_path / "c").mkdir()
    (tmp_path / "c/empty.txt").write_text("  \n")
    params_path = _with_long_context(tmp_path / "c", distractors="empty.txt")
    assert main(["lc", "--params", str(params_path), "--quick"]) == 1
    assert "empty.txt: the distractor source is empty" in capsys.readouterr().err
