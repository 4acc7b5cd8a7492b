"""Writing a lifecycle run's report: ``report.md`` and the figures, the CSV tables for ``dvc plots``
and the continual-learning metrics as JSON."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from model.config import Params
from model.evaluation.continual import DIAGNOSTIC_STATES
from model.io import atomic_dir, write_json, write_text
from reporting.figures import save_png
from reporting.lifecycle.load import load_lifecycle_metrics, show_path
from reporting.lifecycle.metrics import summarize
from reporting.lifecycle.plots import plot_accuracy_matrix, plot_diagnostics, plot_dream_funnel, plot_task_accuracy
from reporting.lifecycle.records import (
    CL_METRICS_PATH,
    FIGURES,
    FUNNEL_STAGES,
    PLOT_CSVS,
    PLOTS_DIR,
    REPORT_DIR,
    REPORT_MD,
    LifecycleMetrics,
)
from reporting.lifecycle.render import render_markdown


def _csv(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in rows:
        w.writerow(["" if v is None else f"{v:.6g}" if isinstance(v, float) else v for v in r])
    return buf.getvalue()


def plot_tables(metrics: LifecycleMetrics) -> dict[str, str]:
    """The CSV texts for ``dvc plots``, by :data:`PLOT_CSVS` key (long tables; blank = none)."""
    width = len(str(len(metrics.cycles) - 1))  # zero-pad cycle labels so they sort as numbers

    def label(i: int) -> str:
        return f"cycle {i:0{width}d}"

    cycles = [[c.period, c.mean_accuracy_seen, c.wake_loss_first, c.wake_loss_last, len(c.consolidations),
               c.dreams_promoted] for c in metrics.cycles]
    task_acc = [[i, j, v] for j in range(metrics.n_tasks) for i, row in enumerate(metrics.accuracy_matrix)
                if (v := row[j]) is not None]
    matrix = [[i, j, v] for i, row in enumerate(metrics.accuracy_matrix) for j, v in enumerate(row) if v is not None]
    funnel = [[c.period, f"{label(c.period)} · {k + 1} {s.replace('_', ' ')}", s, c.dream_funnel.stage(s)]
              for c in metrics.cycles if c.dream_funnel is not None
              for k, s in enumerate(FUNNEL_STAGES) if c.dream_funnel.stage(s) is not None]
    diagnostics = [[c.period, state, j, accs[j]] for c in metrics.cycles for state, _ in DIAGNOSTIC_STATES
                   if (accs := c.diagnostics.get(state)) is not None for j in sorted(accs)]
    return {
        "cycles": _csv(["cycle", "mean_accuracy_seen", "wake_loss_first", "wake_loss_last", "consolidations",
                        "dreams_promoted"], cycles),
        "task_accuracy": _csv(["cycle", "task", "accuracy"], task_acc),
        "accuracy_matrix": _csv(["after_cycle", "task", "accuracy"], matrix),
        "dream_funnel": _csv(["cycle", "label", "stage", "count"], funnel),
        "diagnostics": _csv(["cycle", "state", "task", "accuracy"], diagnostics),
    }


def write_plot_tables(metrics: LifecycleMetrics, plots_dir: str | Path) -> dict[str, Path]:
    """Write :func:`plot_tables` atomically into ``plots_dir``; return the paths by key."""
    plots_dir = Path(plots_dir)
    return {k: write_text(plots_dir / PLOT_CSVS[k], text) for k, text in plot_tables(metrics).items()}


def write_lifecycle_report(
    root: str | Path,
    params: Params,
    out_dir: str | Path | None = None,
    plots_dir: str | Path | None = None,
    cl_metrics_path: str | Path | None = None,
) -> dict[str, Any]:
    """Read a lifecycle run, write its report and plot tables; return the summary.

    Writes ``out_dir`` (default ``reports/lifecycle``) as a whole, atomically: ``report.md``
    and the PNGs of :data:`FIGURES`. Writes the CSVs of :data:`PLOT_CSVS` into ``plots_dir``
    (default ``metrics/plots``) and the continual-learning metrics as JSON (default
    ``metrics/continual_learning.json``). Relative paths are under ``root``. The summary
    (:func:`summarize`) gets a ``files`` entry with every path written, relative to ``root``.
    """
    root = Path(root)
    out = root / (out_dir if out_dir is not None else REPORT_DIR)
    plots = root / (plots_dir if plots_dir is not None else PLOTS_DIR)
    cl_path = root / (cl_metrics_path if cl_metrics_path is not None else CL_METRICS_PATH)
    metrics = load_lifecycle_metrics(root, params)
    summary = summarize(metrics)
    figures = {
        "accuracy_matrix": plot_accuracy_matrix(metrics.accuracy_matrix, metrics.passage_tasks),
        "task_accuracy": plot_task_accuracy(metrics.accuracy_matrix),
        "dream_funnel": plot_dream_funnel([c.dream_funnel for c in metrics.cycles]),
        "diagnostics": plot_diagnostics(metrics.cycles),
    }
    with atomic_dir(out) as tmp:
        for key, fig in figures.items():
            save_png(fig, tmp / FIGURES[key])
        (tmp / REPORT_MD).write_text(render_markdown(metrics, out, root), encoding="utf-8")
    tables = write_plot_tables(metrics, plots)
    write_json(cl_path, summary["continual_learning"])
    summary["files"] = {
        "report": show_path(out / REPORT_MD, root),
        "figures": {k: show_path(out / name, root) for k, name in FIGURES.items()},
        "plots": {k: show_path(p, root) for k, p in tables.items()},
        "metrics": show_path(cl_path, root),
    }
    return summary
