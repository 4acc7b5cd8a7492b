"""The lifecycle report (reporting/lifecycle/): CL metrics, the reader's errors, report.md, PNGs, dvc plot
tables, reruns."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from rich.console import Console

from model.config import Params
from model.io import write_json, write_text
from reporting.figures import DPI, FIGSIZE, save_png
from reporting.lifecycle import (
    FIGURES,
    PLOT_CSVS,
    ReportError,
    continual_learning_metrics,
    load_lifecycle_metrics,
    plot_diagnostics,
    plot_dream_funnel,
    print_summary_table,
    write_lifecycle_report,
)

PARAMS = Params()

# R[i][j]: task j after cycle i. Binary fractions, so every metric below is exact in floating point.
#   final average  (0.25 + 0.75 + 0.5) / 3                      = 0.5
#   forgetting     task 0: max(0.5, 0.75) - 0.25 = 0.5;  task 1: 1.0 - 0.75 = 0.25   -> 0.375
#   BWT            task 0: 0.25 - 0.5 = -0.25;           task 1: 0.75 - 1.0 = -0.25  -> -0.25
#   avg incremental (0.5 + 0.875 + 0.5) / 3                    = 0.625
MATRIX = [[0.5, None, None], [0.75, 1.0, None], [0.25, 0.75, 0.5]]
FUNNEL0 = {"generated": 6, "selected": 3, "rewarded": 2, "passed_gate": 5, "promoted": 2, "rejected": 4}


def _consolidation(slot: int, retention: float | None, ratio: float | None) -> dict[str, Any]:
    return {"src": "fast", "dst": "slow", "slot": slot, "retention_loss": retention, "accuracy_ratio": ratio}


def write_fake_run(root: Path, *, funnel_key: bool = True) -> Path:
    """The files a 3-cycle lifecycle run writes, the way flows/lifecycle.py and its tasks write them.

    cycle 0: one consolidation, dreams (2 of 6 promoted, gate report with one failing check);
    cycle 1: no consolidation due, no dreaming record; cycle 2: a consolidation whose retention is
    undefined (null), dreaming disabled. ``funnel_key=False`` drops ``dream_funnel`` from the rows,
    as in runs from before dreaming existed.
    """
    consolidations = [[_consolidation(1, 1.25, 1.125)], [], [_consolidation(2, None, 0.875)]]
    funnels = [FUNNEL0, None, None]
    periods = []
    for p in range(3):
        accuracy = {str(j): MATRIX[p][j] for j in range(p + 1)}
        row = {"period": p, "accuracy": accuracy, "mean_accuracy_seen": sum(accuracy.values()) / len(accuracy),
               "wake_loss_first": 8.0 - p, "wake_loss_last": 0.015625 * (p + 1),
               "consolidations": consolidations[p], "dream_funnel": funnels[p]}
        if not funnel_key:
            del row["dream_funnel"]
        if p == 1:  # evaluate's per-state diagnostics (lifecycle.diagnostics)
            row["diagnostics"] = {"after_previous_sleep": {"0": 0.5, "1": 0.0}, "after_wake": {"0": 0.125, "1": 1.0},
                                  "after_wake_fast_masked": {"0": 0.625, "1": 0.0},
                                  "after_consolidation": {"0": 0.75, "1": 1.0}, "after_dreaming": {"0": 0.75, "1": 1.0}}
            row["routing_accuracy"] = {"0": 0.875, "1": 0.625}  # prototype routing, measured on the sleep's state
        write_json(root / f"metrics/lifecycle/period-{p}.json", row)  # tasks.wake.write_metrics
        periods.append(row)
        detail = [{**c, "teacher": {"loss": 0.5, "accuracy": 0.8}, "reset": {"loss": 4.0, "accuracy": 0.4},
                   "consolidated": {"loss": 0.25, "accuracy": 0.9}, "distillation": [1.0, 0.5]}
                  for c in consolidations[p]]
        write_json(root / f"metrics/consolidation/period-{p}.json",
                   {"period": p, "consolidations": detail, "dreams": f"dreams/consolidation/period-{p}.parquet"})
    write_json(root / "metrics/dreaming/period-0.json", {"period": 0, "enabled": True, "funnel": FUNNEL0})
    write_json(root / "metrics/dreaming/period-2.json", {"period": 2, "enabled": False})
    gate = {"success": False, "n_dreams": 6, "n_passed": 5, "n_promoted": 2, "n_rejected": 1,
            "failed_checks": ["length_bounds"],
            "checks": [{"name": "schema", "failing_count": 0}, {"name": "length_bounds", "failing_count": 1}]}
    write_json(root / "reports/dreams/period-0/gate.json", gate)
    write_text(root / "reports/dreams/period-0/gate.md", "# Dream gate\n")
    # tasks.evaluate.write_accuracy_summary
    n = len(periods)
    summary = {"periods": n, "accuracy_matrix": [[periods[i]["accuracy"].get(str(j)) for j in range(n)]
                                                 for i in range(n)],
               "final_mean_accuracy": sum(periods[-1]["accuracy"].values()) / n}
    write_json(root / "metrics/lifecycle.json", summary)
    return root


@pytest.fixture
def run(tmp_path: Path) -> Path:
    return write_fake_run(tmp_path)


def _edit(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


# ---------------------------------------------------------------------------------------------
# Continual-learning metrics


def test_cl_metrics_on_a_hand_computed_matrix():
    cl = continual_learning_metrics(MATRIX)
    assert cl.final_average_accuracy == 0.5
    assert cl.forgetting_per_task == {0: 0.5, 1: 0.25}  # task 0's best was after cycle 1, not when learned
    assert cl.forgetting == 0.375
    assert cl.backward_transfer_per_task == {0: -0.25, 1: -0.25}
    assert cl.backward_transfer == -0.25
    assert cl.average_incremental_accuracy == 0.625


def test_cl_metrics_one_task_and_a_task_that_improves():
    one = continual_learning_metrics([[0.75]])
    assert (one.final_average_accuracy, one.forgetting, one.backward_transfer) == (0.75, None, None)
    assert one.forgetting_per_task == {} and one.backward_transfer_per_task == {}
    better = continual_learning_metrics([[0.5, None], [0.75, 0.5]])
    assert better.forgetting == -0.25 and better.backward_transfer == 0.25  # positive transfer, negative forgetting


def test_cl_metrics_pass_over_a_period_of_passages_only_and_keep_its_row():
    # cycle 1 read plain passages only: no column of its own; its row still counts for task 0's best
    matrix = [[0.5, None, None], [1.0, None, None], [0.5, None, 0.75]]
    cl = continual_learning_metrics(matrix, passage_tasks=[1])
    assert cl.final_average_accuracy == 0.625
    assert cl.forgetting_per_task == {0: 0.5} and cl.backward_transfer_per_task == {0: 0.0}
    assert cl.average_incremental_accuracy == (0.5 + 1.0 + 0.625) / 3
    with pytest.raises(ValueError, match=r"accuracy_matrix\[2\]\[1\]"):  # a passage task with a value
        continual_learning_metrics([[0.5, None, None], [1.0, None, None], [0.5, 0.5, 0.75]], passage_tasks=[1])
    with pytest.raises(ValueError, match="plain passages only"):
        continual_learning_metrics([[None]], passage_tasks=[0])


def test_cl_metrics_reject_a_matrix_with_a_hole():
    with pytest.raises(ValueError, match=r"accuracy_matrix\[1\]\[0\]"):
        continual_learning_metrics([[0.5, None], [None, 0.5]])
    with pytest.raises(ValueError, match="square"):
        continual_learning_metrics([[0.5, None]])


# ---------------------------------------------------------------------------------------------
# Reading the run


def test_load_reads_every_part_and_missing_parts_as_none(run):
    m = load_lifecycle_metrics(run, PARAMS)
    assert m.n_tasks == 3 and [c.period for c in m.cycles] == [0, 1, 2]
    assert m.accuracy_matrix == tuple(tuple(r) for r in MATRIX)
    c0, c1, c2 = m.cycles
    assert c0.accuracy == {0: 0.5} and c1.accuracy == {0: 0.75, 1: 1.0} and c1.mean_accuracy_seen == 0.875
    (k,) = c0.consolidations
    assert (k.src, k.dst, k.slot, k.retention_loss, k.accuracy_ratio) == ("fast", "slow", 1, 1.25, 1.125)
    assert (k.teacher.accuracy, k.reset.accuracy, k.consolidated.accuracy) == (0.8, 0.4, 0.9)
    assert c0.dream_funnel.promoted == 2 and c0.dreaming == "on"
    assert c0.gate.failing == {"length_bounds": 1} and c0.gate.report_md == run / "reports/dreams/period-0/gate.md"
    assert c1.consolidations == () and c1.dream_funnel is None and c1.dreaming == "none" and c1.gate is None
    assert c2.consolidations[0].retention_loss is None and c2.dreaming == "off"


def test_dream_funnel_falls_back_to_the_dreaming_metrics(tmp_path):
    run = write_fake_run(tmp_path, funnel_key=False)  # lifecycle rows from before dreaming existed
    m = load_lifecycle_metrics(run, PARAMS)
    assert m.cycles[0].dream_funnel.generated == 6  # from metrics/dreaming/period-0.json
    assert [c.dreaming for c in m.cycles] == ["on", "none", "off"]
    (run / "metrics/dreaming/period-0.json").unlink()
    assert load_lifecycle_metrics(run, PARAMS).cycles[0].dream_funnel is None


def _set_retention(d):
    d["consolidations"][0]["retention_loss"] = "high"


def _drop_wake_loss(d):
    del d["wake_loss_last"]


def _negative_promoted(d):
    d["dream_funnel"]["promoted"] = -1


def _accuracy_above_one(d):
    d["accuracy_matrix"][2][1] = 1.5


def _value_above_diagonal(d):
    d["accuracy_matrix"][0][2] = 0.5


def _stale_matrix(d):
    d["accuracy_matrix"][1][0] = 0.5


def _gate_without_counts(d):
    del d["checks"][1]["failing_count"]


@pytest.mark.parametrize(
    ("file", "change", "message"),
    [
        ("metrics/lifecycle/period-0.json", _set_retention,
         r"metrics/lifecycle/period-0\.json: field 'consolidations\[0\]\.retention_loss': expected a number or null"),
        ("metrics/lifecycle/period-1.json", _drop_wake_loss,
         r"metrics/lifecycle/period-1\.json: field 'wake_loss_last': missing"),
        ("metrics/lifecycle/period-0.json", _negative_promoted,
         r"metrics/lifecycle/period-0\.json: field 'dream_funnel\.promoted': expected a non-negative integer"),
        ("metrics/lifecycle.json", _accuracy_above_one,
         r"metrics/lifecycle\.json: field 'accuracy_matrix\[2\]\[1\]': expected an accuracy in \[0, 1\]"),
        ("metrics/lifecycle.json", _value_above_diagonal,
         r"metrics/lifecycle\.json: field 'accuracy_matrix\[0\]\[2\]': task 2 is not learned"),
        ("metrics/lifecycle.json", _stale_matrix,
         r"metrics/lifecycle\.json: field 'accuracy_matrix\[1\]\[0\]': is 0\.5 but metrics/lifecycle/period-1\.json"),
        ("reports/dreams/period-0/gate.json", _gate_without_counts,
         r"reports/dreams/period-0/gate\.json: field 'checks\[1\]\.failing_count': missing"),
    ],
)
def test_a_malformed_file_names_the_file_and_the_field(run, file, change, message):
    _edit(run / file, change)
    with pytest.raises(ReportError, match=message):
        load_lifecycle_metrics(run, PARAMS)
    with pytest.raises(ReportError):
        write_lifecycle_report(run, PARAMS)
    assert not (run / "reports/lifecycle").exists()  # nothing half-written


def test_unreadable_and_missing_files(run):
    (run / "metrics/consolidation/period-2.json").write_text("{not json")
    with pytest.raises(ReportError, match=r"metrics/consolidation/period-2\.json: not valid JSON"):
        load_lifecycle_metrics(run, PARAMS)
    (run / "metrics/consolidation/period-2.json").unlink()  # optional: held-out measures become unknown
    assert load_lifecycle_metrics(run, PARAMS).cycles[2].consolidations[0].teacher is None
    (run / "metrics/lifecycle/period-2.json").unlink()
    with pytest.raises(ReportError, match=r"metrics/lifecycle/period-2\.json: file not found"):
        load_lifecycle_metrics(run, PARAMS)
    (run / "metrics/lifecycle.json").unlink()
    with pytest.raises(ReportError, match=r"metrics/lifecycle\.json: file not found \(run the lifecycle first"):
        load_lifecycle_metrics(run, PARAMS)


# ---------------------------------------------------------------------------------------------
# The report


def _png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        im.load()
        assert "Software" not in im.info  # no version tag: identical bytes across matplotlib patch releases
        return im.size


def test_write_report_writes_markdown_pngs_csvs_and_metrics(run):
    summary = write_lifecycle_report(run, PARAMS)
    out = run / "reports/lifecycle"
    md = (out / "report.md").read_text()
    # The per-cycle table, the matrix, the CL metrics.
    assert "| 1 | 0.750 | 1.000 | – | 0.875 | 7.000 → 0.0312 | none | none |" in md
    assert "| 0 | 0.500 | – | – | 0.500 | 8.000 → 0.0156 | fast→slow (slot 1, retention 1.25) | 2 of 6 |" in md
    assert "| 2 | 0.250 | 0.750 | 0.500 |" in md
    assert "| forgetting | 0.375 |" in md and "| backward transfer | -0.250 |" in md
    assert "| final average accuracy | 0.500 |" in md
    assert "| 0 | 0.500 | 0.750 | 0.250 | 0.500 | -0.250 |" in md  # task 0: learned, best, final, F, BWT
    # Consolidations (a cycle without one renders as none; an undefined retention as n/a) and dreams.
    assert "| 0 | fast → slow | 1 |" in md and "| 1 | none | – |" in md and "| 2 | fast → slow | 2 |" in md
    # Where forgetting happens: the states of cycle 1, every seen task among all seen labels.
    assert "| 1 | after wake | 0.125 | 1.000 | – |" in md
    assert "| 1 | after wake fast masked | 0.625 | 0.000 | – |" in md
    assert "| 1 | after consolidation | 0.750 | 1.000 | – |" in md
    # Routing: only the cycle that recorded it has a row.
    routing = md[md.index("## Routing"):md.index("## Dreams")]
    assert "| 1 | 0.875 | 0.625 | – |" in routing and "| 0 |" not in routing and "| 2 |" not in routing
    assert "| 0 | 6 | 3 | 2 | 5 | 2 | 4 | length_bounds 1 ([gate report](../dreams/period-0/gate.md)) |" in md
    assert "| 1 | none | – | – | – | – | – | – |" in md
    assert "| 2 | none (dreaming off) | – | – | – | – | – | – |" in md
    for name in FIGURES.values():
        assert f"]({name})" in md
        assert _png_size(out / name) == (round(FIGSIZE[0] * DPI), round(FIGSIZE[1] * DPI))
        assert (out / name).stat().st_size > 10_000
    assert summary["files"]["report"] == "reports/lifecycle/report.md"
    assert summary["continual_learning"]["forgetting"] == 0.375
    assert [c["dreams_promoted"] for c in summary["cycles"]] == [2, None, None]
    assert json.loads((run / "metrics/continual_learning.json").read_text())["backward_transfer"] == -0.25
    assert sorted(p.name for p in out.iterdir()) == sorted([*FIGURES.values(), "report.md"])  # no temp files left


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def test_plot_tables_for_dvc(run):
    write_lifecycle_report(run, PARAMS)
    plots = run / "metrics/plots"
    header, rows = _read_csv(plots / PLOT_CSVS["task_accuracy"])
    assert header == ["cycle", "task", "accuracy"]
    assert [(r["cycle"], r["task"], float(r["accuracy"])) for r in rows if r["task"] == "0"] == [
        ("0", "0", 0.5), ("1", "0", 0.75), ("2", "0", 0.25)]
    assert len(rows) == 6
    header, rows = _read_csv(plots / PLOT_CSVS["accuracy_matrix"])
    assert header == ["after_cycle", "task", "accuracy"] and len(rows) == 6
    assert {(int(r["after_cycle"]), int(r["task"])): float(r["accuracy"]) for r in rows} == {
        (i, j): v for i, row in enumerate(MATRIX) for j, v in enumerate(row) if v is not None}
    header, rows = _read_csv(plots / PLOT_CSVS["dream_funnel"])
    assert header == ["cycle", "label", "stage", "count"]
    assert [(r["stage"], int(r["count"])) for r in rows] == list(FUNNEL0.items())  # cycles without dreams: no rows
    assert rows[0]["label"] == "cycle 0 · 1 generated"
    header, rows = _read_csv(plots / PLOT_CSVS["diagnostics"])
    assert header == ["cycle", "state", "task", "accuracy"] and len(rows) == 10
    assert ("1", "after_wake_fast_masked", "0", "0.625") in [tuple(r.values()) for r in rows]
    header, rows = _read_csv(plots / PLOT_CSVS["cycles"])
    assert header[:2] == ["cycle", "mean_accuracy_seen"] and [r["dreams_promoted"] for r in rows] == ["2", "", ""]


def test_rerun_gives_identical_bytes(run, tmp_path_factory):
    write_lifecycle_report(run, PARAMS)
    written = sorted(p for d in ("reports/lifecycle", "metrics/plots") for p in (run / d).iterdir())
    written.append(run / "metrics/continual_learning.json")
    first = {p: p.read_bytes() for p in written}
    write_lifecycle_report(run, PARAMS)
    assert {p: p.read_bytes() for p in written} == first
    # A copy of the run elsewhere gives the same bytes too (nothing depends on the absolute path).
    other = write_fake_run(tmp_path_factory.mktemp("other"))
    write_lifecycle_report(other, PARAMS)
    assert all((other / p.relative_to(run)).read_bytes() == b for p, b in first.items())


def test_plots_with_nothing_to_show_still_render(tmp_path):
    for name, fig in (("funnel.png", plot_dream_funnel([None, None])), ("diagnostics.png", plot_diagnostics([]))):
        assert _png_size(save_png(fig, tmp_path / name)) == (round(FIGSIZE[0] * DPI), round(FIGSIZE[1] * DPI))


def test_summary_table(run):
    console = Console(record=True, width=160, color_system=None)
    print_summary_table(write_lifecycle_report(run, PARAMS), console)
    text = console.export_text()
    assert re.search(r"│\s+1 │\s+0\.75 │\s+1\.00 │\s+– │\s+0\.88 │ none\s+│\s+none │", text)
    assert "fast→slow 1.25" in text and "fast→slow n/a" in text and "2 of 6" in text and "none (off)" in text
    assert "forgetting 0.375" in text and "backward transfer -0.250" in text
    assert "report: reports/lifecycle/report.md" in text
