"""Report rendering: every report the project writes, as a library (no Prefect; tasks/report.py
wraps the writers in tasks).

- ``reporting.lifecycle``: the lifecycle report (``reports/lifecycle/``, ``metrics/plots/``, the
  continual-learning metrics), split into records, loading, metrics, plots, rendering, writing.
- ``reporting.comparison``: a class-incremental comparison's ``reports/<name>/``.
- ``reporting.knowledge``: a knowledge-incorporation comparison's ``reports/<name>/``.
- ``reporting.long_context``: a long-context comparison's ``reports/<name>/``.
- ``reporting.common``: 95% CIs as ``{mean, low, high}``, their text and error bars, Markdown escaping.
- ``reporting.figures``: the figures' style and palette; PNGs with identical bytes on a rerun.

The names below load their module on first use, so ``from reporting import escape_md`` does not
import matplotlib (or torch, which ``reporting.knowledge`` needs through model.evaluation.incorporation).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from reporting.common import escape_md
    from reporting.comparison import write_comparison_report
    from reporting.figures import COLORS, save_png
    from reporting.knowledge import write_knowledge_report
    from reporting.lifecycle import (
        FIGURES,
        PLOT_CSVS,
        REPORT_DIR,
        ReportError,
        print_summary_table,
        write_lifecycle_report,
    )
    from reporting.long_context import write_long_context_report

_WHERE = {
    "COLORS": "reporting.figures",
    "FIGURES": "reporting.lifecycle",
    "PLOT_CSVS": "reporting.lifecycle",
    "REPORT_DIR": "reporting.lifecycle",
    "ReportError": "reporting.lifecycle",
    "escape_md": "reporting.common",
    "print_summary_table": "reporting.lifecycle",
    "save_png": "reporting.figures",
    "write_comparison_report": "reporting.comparison",
    "write_knowledge_report": "reporting.knowledge",
    "write_lifecycle_report": "reporting.lifecycle",
    "write_long_context_report": "reporting.long_context",
}

__all__ = [
    "COLORS",
    "FIGURES",
    "PLOT_CSVS",
    "REPORT_DIR",
    "ReportError",
    "escape_md",
    "print_summary_table",
    "save_png",
    "write_comparison_report",
    "write_knowledge_report",
    "write_lifecycle_report",
    "write_long_context_report",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
