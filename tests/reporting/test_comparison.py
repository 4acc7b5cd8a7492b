"""The class-incremental comparison's target check (reporting/comparison.py), on hand-made summaries."""

from __future__ import annotations

import pytest

from reporting.common import ci_summary
from model.config import Params
from reporting.comparison import machines_table, markdown, target_check
from tasks.machine import machine


def _summary(per_seed: dict[str, tuple]) -> dict:
    """method -> (final accuracy per seed, forgetting per seed[, earlier tasks' final accuracy per seed]), seeds
    0..n-1 (the earlier tasks' accuracy defaults to the final accuracy)."""
    out = {}
    for m, (acc, forg, *earlier) in per_seed.items():
        early = earlier[0] if earlier else acc
        out[m] = {"final_accuracy": ci_summary(acc), "forgetting": ci_summary(forg), "earlier_accuracy": ci_summary(early),
                  "per_seed": {"final_accuracy": acc, "forgetting": forg, "earlier_accuracy": early},
                  "seeds": list(range(len(acc))), "stores_raw_data": m == "replay"}
    return out


def test_a_sleep_that_does_not_forget_least_gets_its_paired_gap_to_the_method_that_does():
    summary = _summary({
        "ewc": ([0.6, 0.7, 0.5], [0.3, 0.2, 0.4]),
        "sleep_consolidation": ([0.85, 0.9, 0.8], [0.01, 0.01, 0.0]),
        "sleep": ([0.9, 0.95, 0.85], [0.05, 0.0, 0.0]),
        "replay": ([0.88, 0.9, 0.86], [0.1, 0.1, 0.1]),
    })
    t = target_check(summary, against=("ewc",))
    assert t["lowest_forgetting"] == "sleep_consolidation" and not t["lowest_forgetting_ok"] and not t["met"]
    gap = t["forgetting_gap"]
    assert gap["other"] == "sleep_consolidation" and gap["seeds"] == [0, 1, 2]
    assert gap["mean"] == pytest.approx((0.04 - 0.01 + 0.0) / 3)
    assert gap["low"] < 0 < gap["high"]  # one seed's difference: not told apart
    assert t["margins"]["ewc"]["mean"] == pytest.approx(0.9 - 0.6)


def test_beside_the_forgetting_gap_the_report_pairs_where_the_earlier_tasks_end():
    # sleep forgets a little more than copy_distilled, whose earlier tasks never got as high: they end lower
    summary = _summary({
        "ewc": ([0.6, 0.7, 0.5], [0.3, 0.2, 0.4], [0.4, 0.5, 0.3]),
        "copy_distilled": ([0.85, 0.86, 0.84], [0.0, 0.01, 0.0], [0.80, 0.82, 0.81]),
        "sleep": ([0.9, 0.95, 0.85], [0.01, 0.01, 0.01], [0.90, 0.93, 0.88]),
    })
    for m in summary.values():
        m.update(backward_transfer=ci_summary([0.0, 0.0, 0.0]), gradient_steps=1, seconds=60.0)
    t = target_check(summary, against=("ewc",))
    assert t["lowest_forgetting"] == "copy_distilled" and not t["met"]
    e = t["earlier_gap"]
    assert e["other"] == "copy_distilled" and e["mean"] == pytest.approx((0.10 + 0.11 + 0.07) / 3) and e["above_zero"]
    md = markdown("toy", "", summary, t, [0, 1, 2], [], Params())
    assert "| copy_distilled | no | 0.850 [" in md and "earlier tasks' final accuracy" in md
    assert f"- sleep - copy_distilled, the earlier tasks' final accuracy (every task but the last, at the end), " \
           f"paired over seeds [0, 1, 2]: {e['mean']:.3f} [" in md
    # one-task runs define no earlier task: the column says n/a and nothing is paired on it
    for m in summary.values():
        m["earlier_accuracy"] = {"mean": None, "low": None, "high": None}
        m["per_seed"]["earlier_accuracy"] = [None, None, None]
    t = target_check(summary, against=("ewc",))
    assert t["earlier_gap"] is None and "| sleep | no | 0.900 [" in markdown("toy", "", summary, t, [0, 1, 2], [], Params())
    assert "| n/a |" in markdown("toy", "", summary, t, [0, 1, 2], [], Params())


def test_a_sleep_that_forgets_least_has_no_gap_and_can_meet_the_target():
    summary = _summary({
        "ewc": ([0.6, 0.7, 0.5], [0.3, 0.2, 0.4]),
        "sleep": ([0.9, 0.95, 0.85], [0.0, 0.01, 0.0]),
        "replay": ([0.88, 0.9, 0.86], [0.1, 0.1, 0.1]),
    })
    t = target_check(summary, against=("ewc",))
    assert t["lowest_forgetting_ok"] and "forgetting_gap" not in t and t["met"]


def test_runs_from_two_machines_are_flagged_and_listed():
    here = machine("cpu", threads=2)
    other = {**here, "processor": "another CPU", "id": "0123456789ab"}
    assert machine("cpu", threads=2)["id"] == here["id"] and machine("cpu", threads=1)["id"] != here["id"]
    summary = _summary({"ewc": ([0.6, 0.7], [0.3, 0.2]), "sleep": ([0.9, 0.95], [0.0, 0.01])})
    for m in summary.values():
        m.update(backward_transfer=ci_summary([0.0, 0.0]), gradient_steps=1, seconds=60.0)
    runs = [{"method": m, "seed": s, "accuracy": [{"0": 0.9}], "gradient_steps": 1, "seconds": 1.0,
             "machine": here if (m, s) != ("sleep", 1) else other} for m in ("ewc", "sleep") for s in (0, 1)]
    table = machines_table(runs + [{"method": "ewc", "seed": 2, "accuracy": [], "gradient_steps": 0, "seconds": 0}])
    assert table["machine"].tolist() == [here["id"]] * 3 + ["0123456789ab", "unknown"]
    target = target_check(summary, against=("ewc",))
    md = markdown("toy", "", summary, target, [0, 1], runs, Params())
    assert "These runs come from 2 machines" in md and "| 0123456789ab | another CPU |" in md
    assert f"| {here['id']} | {here['processor']} |" in md and "sleep 1 |" in md
    one = markdown("toy", "", summary, target, [0, 1], [{**r, "machine": here} for r in runs], Params())
    assert "machines**" not in one and "## Machines" in one


def test_the_report_names_the_data_its_runs_read_whatever_the_description_says():
    summary = _summary({"ewc": ([0.6, 0.7], [0.3, 0.2]), "sleep": ([0.9, 0.95], [0.0, 0.01])})
    for m in summary.values():
        m.update(backward_transfer=ci_summary([0.0, 0.0]), gradient_steps=1, seconds=60.0)
    target = target_check(summary, against=("ewc",))
    params = Params.model_validate({"data": {"source": {"path": "derived/titles.jsonl", "format": "jsonl",
                                                       "text_field": "question", "label_field": "title",
                                                       "exclude_labels": []}}})
    md = markdown("toy", "On the CLINC150 stream.", summary, target, [0, 1], [], params)
    assert "Data: `derived/titles.jsonl` (jsonl; text `question`, label `title`)." in md
    assert "Data: `data/raw/clinc150/data_full.json` (clinc150; text `text`, label `label`; excluded labels ['oos'])" \
        in markdown("toy", "", summary, target, [0, 1], [], Params())
