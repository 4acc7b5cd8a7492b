"""The lifecycle report: read the metrics a lifecycle run wrote, compute the continual-learning
metrics, draw the figures and write ``report.md`` plus CSV tables for ``dvc plots``.

Inputs, all written by the lifecycle flow (paths from params.yaml, relative to the project root):

- ``metrics/lifecycle.json``: the accuracy matrix ``R[i][j]`` (accuracy on task ``j`` after the
  sleep of cycle ``i``; null above the diagonal), ``final_mean_accuracy``, ``periods``.
- ``metrics/lifecycle/period-N.json``: per cycle, accuracy on the seen tasks, the wake loss, the
  consolidations of its sleep and the dream funnel (null or absent when nothing was dreamt).
- optional: ``metrics/consolidation/period-N.json`` (teacher / reset / consolidated held-out
  accuracy), ``metrics/dreaming/period-N.json`` (the funnel, when the lifecycle row has none),
  ``reports/dreams/period-N/gate.json`` (why the gate rejected dreams).

A missing optional part renders as "none". A file that exists but does not have the expected
shape raises :class:`ReportError` naming the file and the field.

Everything here is a pure function of the input files: the figures have fixed sizes, a fixed
style and no timestamp or software tag, so a rerun writes byte-identical PNGs and markdown.

Modules: ``records`` (what a run left behind, the report's paths), ``load`` (reading it),
``metrics`` (continual-learning metrics, the summary), ``plots``, ``render`` (Markdown, console
table), ``write`` (the report's files).
"""

from __future__ import annotations

from reporting.lifecycle.load import load_lifecycle_metrics
from reporting.lifecycle.metrics import CLMetrics, continual_learning_metrics, summarize
from reporting.lifecycle.plots import plot_accuracy_matrix, plot_diagnostics, plot_dream_funnel, plot_task_accuracy
from reporting.lifecycle.records import (
    CL_METRICS_PATH,
    FIGURES,
    FUNNEL_STAGES,
    PLOT_CSVS,
    PLOTS_DIR,
    REPORT_DIR,
    REPORT_MD,
    Consolidation,
    Cycle,
    DreamFunnel,
    GateSummary,
    HeldOut,
    LifecycleMetrics,
    ReportError,
)
from reporting.lifecycle.render import print_summary_table, render_markdown
from reporting.lifecycle.write import plot_tables, write_lifecycle_report, write_plot_tables

__all__ = [
    "CL_METRICS_PATH",
    "CLMetrics",
    "Consolidation",
    "Cycle",
    "DreamFunnel",
    "FIGURES",
    "FUNNEL_STAGES",
    "GateSummary",
    "HeldOut",
    "LifecycleMetrics",
    "PLOT_CSVS",
    "PLOTS_DIR",
    "REPORT_DIR",
    "REPORT_MD",
    "ReportError",
    "continual_learning_metrics",
    "load_lifecycle_metrics",
    "plot_accuracy_matrix",
    "plot_diagnostics",
    "plot_dream_funnel",
    "plot_tables",
    "plot_task_accuracy",
    "print_summary_table",
    "render_markdown",
    "summarize",
    "write_lifecycle_report",
    "write_plot_tables",
]
