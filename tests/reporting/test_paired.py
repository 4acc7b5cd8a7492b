"""``lm-sleep paired`` (reporting/paired.py, flows/paired.py): runs that live apart, paired over their common seeds."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from flows.paired import main
from reporting.paired import PairedInputError, paired_markdown, paired_runs, side_runs

# Student-t 0.975 quantiles, from tables (not from the code under test)
T975 = {1: 12.706204736174698, 2: 4.302652729749464, 3: 3.182446305284263}


def _write(root: Path, method: str, seed: int, rows: list[dict], machine: str = "m1") -> Path:
    path = root / method / f"seed-{seed}" / "result.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"method": method, "seed": seed, "accuracy": rows, "key": "k", "seconds": 1.0,
                                "machine": {"id": machine}}))
    return path


def _rows(task0: tuple[float, float], task1: float) -> list[dict]:
    """Two tasks: task 0 after task 0, then task 0 and task 1 after task 1."""
    return [{"0": task0[0]}, {"0": task0[1], "1": task1}]


def _interval(diffs: list[float]) -> tuple[float, float, float]:
    n = len(diffs)
    m = sum(diffs) / n
    s = math.sqrt(sum((d - m) ** 2 for d in diffs) / (n - 1))
    half = T975[n - 1] * s / math.sqrt(n)
    return m, m - half, m + half


def test_pairs_only_the_common_seeds_and_summarises_each_side_over_its_own(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    # final = mean of the last row; forgetting = best earlier accuracy of task 0 minus its last
    for seed, (t0, t1) in enumerate([((0.9, 0.8), 1.0), ((1.0, 0.9), 0.8), ((0.8, 0.8), 0.9), ((0.7, 0.7), 0.7)]):
        _write(a, "sleep", seed, _rows(t0, t1))
    for seed, (t0, t1) in enumerate([((0.9, 0.2), 1.0), ((0.9, 0.4), 0.9), ((1.0, 0.2), 0.9)]):
        _write(b, "ewc", seed, _rows(t0, t1))
    report = paired_runs(side_runs([a], "--a"), side_runs([b], "--b"), ("sleep", "ewc"))
    assert report["seeds"] == {"a": [0, 1, 2, 3], "b": [0, 1, 2], "common": [0, 1, 2]}
    final_a = [0.9, 0.85, 0.85, 0.7]
    final_b = [0.6, 0.65, 0.55]
    assert report["sides"]["sleep"]["final_accuracy"]["mean"] == pytest.approx(sum(final_a) / 4)  # all 4 of its seeds
    m, lo, hi = _interval([x - y for x, y in zip(final_a, final_b)])
    d = report["difference"]["final_accuracy"]
    assert (d["mean"], d["low"], d["high"]) == pytest.approx((m, lo, hi))
    assert d["above_zero"] and not d["below_zero"]
    m, lo, hi = _interval([0.1 - 0.7, 0.1 - 0.5, 0.0 - 0.8])
    f = report["difference"]["forgetting"]
    assert (f["mean"], f["low"], f["high"]) == pytest.approx((m, lo, hi))
    assert f["below_zero"] and not f["above_zero"]
    m, lo, hi = _interval([0.8 - 0.2, 0.9 - 0.4, 0.8 - 0.2])  # task 0 at the end
    e = report["difference"]["earlier_accuracy"]
    assert (e["mean"], e["low"], e["high"]) == pytest.approx((m, lo, hi))
    assert report["same_machine"]
    text = paired_markdown(report)
    assert "| 3 | 0.700 | – | 0.700 | – |" in text  # a seed only one side ran is shown, not paired
    assert f"sleep - ewc, final accuracy, paired over 3 seeds: {d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] " \
           "(above zero)" in text


def test_one_side_may_come_from_several_folders_and_other_machines_are_said(tmp_path):
    _write(tmp_path / "w1", "sleep", 0, _rows((0.9, 0.9), 0.9))
    _write(tmp_path / "w2", "sleep", 1, _rows((0.8, 0.8), 0.8), machine="m2")
    _write(tmp_path / "b", "ewc", 0, _rows((0.9, 0.5), 0.9))
    _write(tmp_path / "b", "ewc", 1, _rows((0.9, 0.4), 0.9))
    report = paired_runs(side_runs([tmp_path / "w1", tmp_path / "w2"], "--a"), side_runs([tmp_path / "b"], "--b"))
    assert report["seeds"]["common"] == [0, 1] and report["labels"] == ["A", "B"]
    assert report["machines"]["A"] == ["m1", "m2"] and not report["same_machine"]
    assert "not one machine" in paired_markdown(report)


@pytest.mark.parametrize("case, message", [
    ("duplicate", "two runs of seed 0"),
    ("methods", "runs of several methods (ewc, sleep)"),
    ("tasks", "has 2 tasks and"),
    ("disjoint", "no seed in common: A ran [0], B ran [1]"),
    ("same", "is on both sides"),
    ("empty", "no result.json under"),
])
def test_runs_that_cannot_be_paired_are_refused_with_the_side_and_the_files(tmp_path, case, message):
    a = tmp_path / "a"
    _write(a, "sleep", 0, _rows((0.9, 0.9), 0.9))
    b = tmp_path / "b"
    if case == "duplicate":
        _write(tmp_path / "again", "sleep", 0, _rows((0.8, 0.8), 0.8))
        with pytest.raises(PairedInputError, match=message):
            side_runs([a, tmp_path / "again"], "--a")
        return
    if case == "methods":
        _write(a, "ewc", 1, _rows((0.8, 0.8), 0.8))
        with pytest.raises(PairedInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
            side_runs([a], "--a")
        return
    if case == "empty":
        b.mkdir()
        with pytest.raises(PairedInputError, match=message):
            side_runs([b], "--b")
        return
    if case == "tasks":
        _write(b, "ewc", 0, [{"0": 0.9}])
    elif case == "disjoint":
        _write(b, "ewc", 1, _rows((0.9, 0.9), 0.9))
    else:  # the same runs on both sides, one named by a longer path
        b = a / ".." / "a"
    with pytest.raises(PairedInputError, match=message.replace("[", r"\[").replace("]", r"\]")):
        paired_runs(side_runs([a], "--a"), side_runs([b], "--b"))


@pytest.mark.parametrize("result, field", [
    ({"method": "sleep", "seed": "0", "accuracy": [{"0": 0.5}]}, "field 'seed' must be an integer"),
    ({"method": "sleep", "seed": 0, "accuracy": [{"0": 1.5}]}, r"field 'accuracy\[0\]\[0\]' must be a number in \[0, 1\]"),
    ({"method": "sleep", "seed": 0, "accuracy": []}, "field 'accuracy' must be a non-empty list"),
    ({"seed": 0, "accuracy": [{"0": 0.5}]}, "field 'method' must be a string"),
])
def test_a_bad_result_file_is_named_with_its_field(tmp_path, result, field):
    path = tmp_path / "sleep" / "seed-0" / "result.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(result))
    with pytest.raises(PairedInputError, match=f"{path}: {field}"):
        side_runs([tmp_path], "--a")


def test_the_command_prints_the_report_writes_json_and_says_a_bad_input_in_one_line(tmp_path, capsys):
    for seed in (0, 1, 2):
        _write(tmp_path / "a", "sleep", seed, _rows((0.9, 0.9 - 0.05 * seed), 0.9))
        _write(tmp_path / "b", "ewc", seed, _rows((0.9, 0.3 + 0.1 * seed), 0.9))
    out, md = tmp_path / "out" / "paired.json", tmp_path / "out" / "paired.md"
    assert main(["--a", str(tmp_path / "a"), "--b", str(tmp_path / "b"), "--out", str(out), "--markdown", str(md)]) == 0
    printed = capsys.readouterr().out
    assert printed == md.read_text() and printed.startswith("# sleep against ewc")
    saved = json.loads(out.read_text())
    assert saved["seeds"]["common"] == [0, 1, 2] and saved["difference"]["final_accuracy"]["above_zero"]
    (tmp_path / "b" / "ewc" / "seed-1" / "result.json").write_text("{not json")
    assert main(["--a", str(tmp_path / "a"), "--b", str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "seed-1/result.json: not a readable JSON result" in err[0]
    assert main(["--a", str(tmp_path / "a"), "--b", str(tmp_path / "a" / "sleep" / "seed-0"), "--labels", "x", "x"]) == 1
    assert "--labels: the two sides need different names" in capsys.readouterr().err
