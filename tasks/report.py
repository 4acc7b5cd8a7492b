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
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib.style
from matplotlib.figure import Figure
from prefect import Task, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State, TaskRun
from rich.console import Console
from rich.table import Table

from model.config import Params
from model.continual import DIAGNOSTIC_STATES
from model.io import atomic_dir, atomic_path, write_json, write_text
from tasks.expectations import _md  # text inert in any Markdown renderer

REPORT_DIR = Path("reports/lifecycle")
PLOTS_DIR = Path("metrics/plots")
CL_METRICS_PATH = Path("metrics/continual_learning.json")
REPORT_MD = "report.md"
FIGURES = {
    "accuracy_matrix": "accuracy_matrix.png",
    "task_accuracy": "task_accuracy.png",
    "dream_funnel": "dream_funnel.png",
    "diagnostics": "diagnostics.png",
}
PLOT_CSVS = {
    "cycles": "cycles.csv",
    "task_accuracy": "task_accuracy.csv",
    "accuracy_matrix": "accuracy_matrix.csv",
    "dream_funnel": "dream_funnel.csv",
    "diagnostics": "diagnostics.csv",
}
FUNNEL_STAGES: tuple[str, ...] = ("generated", "selected", "rewarded", "passed_gate", "promoted", "rejected")
FUNNEL_REQUIRED: tuple[str, ...] = ("generated", "selected", "rewarded", "promoted")
FIGSIZE = (6.4, 4.2)  # inches; with DPI the PNGs are 832 x 546 pixels
DPI = 130
NONE = "none"

__all__ = [
    "CLMetrics",
    "Consolidation",
    "Cycle",
    "DreamFunnel",
    "GateSummary",
    "HeldOut",
    "LifecycleMetrics",
    "ReportError",
    "continual_learning_metrics",
    "load_lifecycle_metrics",
    "plot_accuracy_matrix",
    "plot_dream_funnel",
    "plot_diagnostics",
    "plot_tables",
    "plot_task_accuracy",
    "print_summary_table",
    "render_markdown",
    "report_task",
    "save_png",
    "summarize",
    "write_plot_tables",
    "write_report",
]


class ReportError(ValueError):
    """A lifecycle metrics file that is missing or malformed; the message names the file and the field."""


# ---------------------------------------------------------------------------------------------
# What a lifecycle run left behind


@dataclass(frozen=True)
class HeldOut:
    """Held-out loss (nats/token) and accuracy on the period's task, as measured by the sleep."""

    loss: float | None
    accuracy: float | None


@dataclass(frozen=True)
class Consolidation:
    """One consolidation of a sleep: level ``src`` into a new expert (``slot``) of level ``dst``.

    ``retention_loss`` is ``(reset - consolidated) / (reset - teacher)`` on held-out loss (1: as
    good as before the reset, 0: no better than the reset); ``accuracy_ratio`` is consolidated
    accuracy over teacher accuracy. Both are None when undefined (a zero gap). The held-out
    measures come from ``metrics/consolidation/period-N.json`` and are None when it is absent.
    """

    src: str
    dst: str
    slot: int
    retention_loss: float | None
    accuracy_ratio: float | None
    teacher: HeldOut | None = None
    reset: HeldOut | None = None
    consolidated: HeldOut | None = None


@dataclass(frozen=True)
class DreamFunnel:
    """How many dreams of one sleep reached each stage (``passed_gate``/``rejected`` may be absent)."""

    generated: int
    selected: int
    rewarded: int
    promoted: int
    passed_gate: int | None = None
    rejected: int | None = None

    def stage(self, name: str) -> int | None:
        """The count of stage ``name`` (one of :data:`FUNNEL_STAGES`)."""
        return getattr(self, name)


@dataclass(frozen=True)
class GateSummary:
    """The dream gate's verdict for one sleep (``reports/dreams/period-N/gate.json``)."""

    n_dreams: int
    n_promoted: int
    n_rejected: int
    failing: dict[str, int]  # check name -> dreams failing it, only checks that failed
    report_md: Path | None  # gate.md beside gate.json, when present


@dataclass(frozen=True)
class Cycle:
    """One wake/sleep cycle: ``accuracy`` maps task id -> accuracy after the sleep."""

    period: int
    accuracy: dict[int, float]
    mean_accuracy_seen: float | None  # None while every period so far read plain passages only
    wake_loss_first: float
    wake_loss_last: float
    consolidations: tuple[Consolidation, ...]
    dream_funnel: DreamFunnel | None
    dreaming: str  # "on" (a funnel), "off" (dream.enabled false), "none" (no record of dreaming)
    gate: GateSummary | None = None
    # state (DIAGNOSTIC_STATES) -> task -> accuracy among all seen labels; empty when not measured
    diagnostics: dict[str, dict[int, float]] = field(default_factory=dict)
    # task -> share of its test inputs that prototype routing sent to the task's own period; empty without routing
    routing: dict[int, float] = field(default_factory=dict)

    @property
    def dreams_promoted(self) -> int | None:
        return self.dream_funnel.promoted if self.dream_funnel else None


@dataclass(frozen=True)
class LifecycleMetrics:
    """Everything the report shows, read from one lifecycle run.

    ``accuracy_matrix[i][j]`` is the accuracy on task ``j`` after the sleep of cycle ``i``
    (shape ``(T, T)``, None above the diagonal and in the column of a period that read plain
    passages only: ``passage_tasks``); ``sources`` lists the files read.
    """

    cycles: tuple[Cycle, ...]
    accuracy_matrix: tuple[tuple[float | None, ...], ...]
    final_mean_accuracy: float
    sources: tuple[Path, ...] = field(default=())
    passage_tasks: tuple[int, ...] = ()

    @property
    def n_tasks(self) -> int:
        return len(self.accuracy_matrix)


# ---------------------------------------------------------------------------------------------
# Reading, with errors that name the file and the field


def _show(path: Path, root: Path | None) -> str:
    if root is not None:
        with contextlib.suppress(ValueError):
            return str(path.resolve().relative_to(root.resolve()))
    return str(path)


class _File:
    """A parsed JSON file and the helpers that check its fields, naming the file on failure."""

    def __init__(self, path: Path, root: Path | None, data: Any) -> None:
        self.path, self.name, self.data = path, _show(path, root), data

    @classmethod
    def read(cls, path: Path, root: Path | None, *, required: bool, hint: str = "") -> _File | None:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            if required:
                raise ReportError(f"{_show(path, root)}: file not found{hint}") from None
            return None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ReportError(f"{_show(path, root)}: not valid JSON: {e}") from None
        return cls(path, root, data)

    def error(self, where: str, message: str) -> ReportError:
        return ReportError(f"{self.name}: field {where!r}: {message}" if where else f"{self.name}: {message}")

    def get(self, obj: dict[str, Any], key: str, where: str, *, required: bool = True) -> Any:
        if key not in obj:
            if required:
                raise self.error(_join(where, key), "missing")
            return None
        return obj[key]

    def mapping(self, value: Any, where: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.error(where, f"expected an object, got {_brief(value)}")
        return value

    def array(self, value: Any, where: str) -> list[Any]:
        if not isinstance(value, list):
            raise self.error(where, f"expected a list, got {_brief(value)}")
        return value

    def number(self, value: Any, where: str, *, nullable: bool = False, unit: bool = False) -> float | None:
        if value is None and nullable:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise self.error(where, f"expected a number{' or null' if nullable else ''}, got {_brief(value)}")
        if unit and not 0.0 <= value <= 1.0:
            raise self.error(where, f"expected an accuracy in [0, 1], got {value!r}")
        return float(value)

    def integer(self, value: Any, where: str, *, nullable: bool = False) -> int | None:
        if value is None and nullable:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise self.error(where, f"expected a non-negative integer{' or null' if nullable else ''}, "
                                    f"got {_brief(value)}")
        return value

    def string(self, value: Any, where: str) -> str:
        if not isinstance(value, str) or not value:
            raise self.error(where, f"expected a non-empty string, got {_brief(value)}")
        return value


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _brief(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _held_out(f: _File, value: Any, where: str) -> HeldOut | None:
    if value is None:
        return None
    obj = f.mapping(value, where)
    return HeldOut(
        loss=f.number(f.get(obj, "loss", where, required=False), _join(where, "loss"), nullable=True),
        accuracy=f.number(f.get(obj, "accuracy", where, required=False), _join(where, "accuracy"),
                          nullable=True, unit=True),
    )


def _consolidations(row: _File, raw: list[Any], detail: _File | None) -> tuple[Consolidation, ...]:
    """The lifecycle row's consolidations, joined (by position) with the sleep's held-out measures."""
    extra: list[Any] = []
    if detail is not None:
        body = detail.mapping(detail.data, "")
        extra = detail.array(detail.get(body, "consolidations", ""), "consolidations")
        if len(extra) != len(raw):
            raise detail.error("consolidations", f"has {len(extra)} entries but {row.name} lists {len(raw)}")
    out = []
    for k, item in enumerate(raw):
        w = f"consolidations[{k}]"
        c = row.mapping(item, w)
        held: dict[str, HeldOut | None] = {"teacher": None, "reset": None, "consolidated": None}
        if detail is not None:
            d = detail.mapping(extra[k], w)
            for name in held:
                held[name] = _held_out(detail, detail.get(d, name, w, required=False), f"{w}.{name}")
        out.append(Consolidation(
            src=row.string(row.get(c, "src", w), f"{w}.src"),
            dst=row.string(row.get(c, "dst", w), f"{w}.dst"),
            slot=row.integer(row.get(c, "slot", w), f"{w}.slot"),
            retention_loss=row.number(row.get(c, "retention_loss", w), f"{w}.retention_loss", nullable=True),
            accuracy_ratio=row.number(row.get(c, "accuracy_ratio", w), f"{w}.accuracy_ratio", nullable=True),
            **held,
        ))
    return tuple(out)


def _diagnostics(row: _File, value: Any) -> dict[str, dict[int, float]]:
    """A lifecycle row's per-state accuracies (absent: not measured)."""
    if value is None:
        return {}
    out = {}
    for state, accs in row.mapping(value, "diagnostics").items():
        if state not in dict(DIAGNOSTIC_STATES):
            raise row.error(f"diagnostics.{state}", f"unknown state; expected one of {[n for n, _ in DIAGNOSTIC_STATES]}")
        where = f"diagnostics.{state}"
        out[state] = {int(t): row.number(a, f"{where}.{t}", unit=True) for t, a in row.mapping(accs, where).items()}
    return out


def _routing(row: _File, value: Any) -> dict[int, float]:
    """A lifecycle row's routing accuracy per task (absent: no prototype routing)."""
    if value is None:
        return {}
    return {int(t): row.number(a, f"routing_accuracy.{t}", unit=True)
            for t, a in row.mapping(value, "routing_accuracy").items()}


def _funnel(f: _File, value: Any, where: str) -> DreamFunnel:
    obj = f.mapping(value, where)
    counts = {s: f.integer(f.get(obj, s, where), _join(where, s)) for s in FUNNEL_REQUIRED}
    for s in ("passed_gate", "rejected"):
        counts[s] = f.integer(f.get(obj, s, where, required=False), _join(where, s), nullable=True)
    return DreamFunnel(**counts)


def _gate(f: _File) -> GateSummary:
    body = f.mapping(f.data, "")
    failing: dict[str, int] = {}
    for k, item in enumerate(f.array(f.get(body, "checks", ""), "checks")):
        w = f"checks[{k}]"
        c = f.mapping(item, w)
        n = f.integer(f.get(c, "failing_count", w), f"{w}.failing_count")
        if n:
            failing[f.string(f.get(c, "name", w), f"{w}.name")] = n
    md = f.path.with_name("gate.md")
    return GateSummary(
        n_dreams=f.integer(f.get(body, "n_dreams", ""), "n_dreams"),
        n_promoted=f.integer(f.get(body, "n_promoted", ""), "n_promoted"),
        n_rejected=f.integer(f.get(body, "n_rejected", ""), "n_rejected"),
        failing=failing,
        report_md=md if md.is_file() else None,
    )


def _dreaming(
    row: _File, body: dict[str, Any], dream_file: _File | None
) -> tuple[DreamFunnel | None, str]:
    """The cycle's dream funnel and whether dreaming ran: the lifecycle row first, else metrics/dreaming."""
    if "dream_funnel" in body and body["dream_funnel"] is not None:
        return _funnel(row, body["dream_funnel"], "dream_funnel"), "on"
    if dream_file is None:
        return None, NONE
    d = dream_file.mapping(dream_file.data, "")
    enabled = d.get("enabled", True)
    if enabled is False:
        return None, "off"
    if not isinstance(enabled, bool):
        raise dream_file.error("enabled", f"expected true or false, got {_brief(enabled)}")
    if d.get("funnel") is None:
        return None, NONE
    return _funnel(dream_file, d["funnel"], "funnel"), "on"


def _matrix(f: _File, n: int, passage_tasks: Collection[int] = ()) -> tuple[tuple[float | None, ...], ...]:
    body = f.mapping(f.data, "")
    raw = f.array(f.get(body, "accuracy_matrix", ""), "accuracy_matrix")
    if len(raw) != n:
        raise f.error("accuracy_matrix", f"has {len(raw)} rows but periods is {n}")
    rows = []
    for i, r in enumerate(raw):
        r = f.array(r, f"accuracy_matrix[{i}]")
        if len(r) != n:
            raise f.error(f"accuracy_matrix[{i}]", f"has {len(r)} entries, expected {n} (a square matrix)")
        row: list[float | None] = []
        for j, v in enumerate(r):
            w = f"accuracy_matrix[{i}][{j}]"
            if j > i:
                if v is not None:
                    raise f.error(w, f"task {j} is not learned before cycle {j}: expected null, got {_brief(v)}")
                row.append(None)
            elif j in passage_tasks:
                if v is not None:
                    raise f.error(w, f"task {j} read plain passages only (passage_tasks): expected null, got {_brief(v)}")
                row.append(None)
            else:
                row.append(f.number(v, w, unit=True))
        rows.append(tuple(row))
    return tuple(rows)


def load_lifecycle_metrics(root: str | Path, params: Params) -> LifecycleMetrics:
    """Read the metrics of a lifecycle run under ``root`` (paths from ``params``).

    Raises :class:`ReportError` naming the file and the field when a required file is missing,
    a file is not JSON, a field is missing or has the wrong type, or the summary's accuracy
    matrix disagrees with the per-cycle files (files of two different runs).
    """
    root = Path(root)
    summary_path = root / params.lifecycle.summary_path
    hint = " (run the lifecycle first: python -m flows.lifecycle)"
    summary = _File.read(summary_path, root, required=True, hint=hint)
    assert summary is not None
    body = summary.mapping(summary.data, "")
    n = summary.integer(summary.get(body, "periods", ""), "periods")
    if n < 1:
        raise summary.error("periods", "expected at least one cycle, got 0")
    raw_passages = summary.array(body.get("passage_tasks", []), "passage_tasks")
    passage_tasks = tuple(summary.integer(j, f"passage_tasks[{k}]") for k, j in enumerate(raw_passages))
    if set(range(n)) <= set(passage_tasks):
        raise summary.error("passage_tasks", "every period read plain passages only: no accuracy to report")
    matrix = _matrix(summary, n, passage_tasks)
    final = summary.number(summary.get(body, "final_mean_accuracy", ""), "final_mean_accuracy", unit=True)
    sources = [summary_path]

    cycles = []
    for p in range(n):
        row = _File.read(root / params.lifecycle.metrics_dir / f"period-{p}.json", root, required=True, hint=hint)
        assert row is not None
        sources.append(row.path)
        rb = row.mapping(row.data, "")
        period = row.integer(rb.get("period", p), "period")
        if period != p:
            raise row.error("period", f"is {period}, but the file is for cycle {p}")
        acc_obj = row.mapping(row.get(rb, "accuracy", ""), "accuracy")
        accuracy: dict[int, float] = {}
        for key, value in acc_obj.items():
            if not (isinstance(key, str) and key.isdigit()):
                raise row.error(f"accuracy.{key}", "task ids must be non-negative integers")
            accuracy[int(key)] = row.number(value, f"accuracy.{key}", unit=True)
        expected = [j for j in range(p + 1) if j not in passage_tasks]
        if sorted(accuracy) != expected:
            raise row.error("accuracy", f"has tasks {sorted(accuracy)}, expected tasks {expected} after cycle {p}")
        for j in expected:
            if not math.isclose(matrix[p][j], accuracy[j], abs_tol=1e-12):
                raise summary.error(
                    f"accuracy_matrix[{p}][{j}]",
                    f"is {matrix[p][j]!r} but {row.name} has accuracy {accuracy[j]!r} for task {j} "
                    "(files of two different runs?)",
                )
        detail = _File.read(root / params.consolidation.metrics_dir / f"period-{p}.json", root, required=False)
        dream_file = _File.read(root / params.dream.metrics_dir / f"period-{p}.json", root, required=False)
        gate_file = _File.read(root / params.dream.reports_dir / f"period-{p}" / "gate.json", root, required=False)
        sources += [x.path for x in (detail, dream_file, gate_file) if x is not None]
        funnel, dreaming = _dreaming(row, rb, dream_file)
        cycles.append(Cycle(
            period=p,
            accuracy=dict(sorted(accuracy.items())),
            mean_accuracy_seen=(row.number(row.get(rb, "mean_accuracy_seen", ""), "mean_accuracy_seen", unit=True)
                                if accuracy else None),
            wake_loss_first=row.number(row.get(rb, "wake_loss_first", ""), "wake_loss_first"),
            wake_loss_last=row.number(row.get(rb, "wake_loss_last", ""), "wake_loss_last"),
            consolidations=_consolidations(
                row, row.array(row.get(rb, "consolidations", ""), "consolidations"), detail
            ),
            dream_funnel=funnel,
            dreaming=dreaming,
            gate=_gate(gate_file) if gate_file is not None else None,
            diagnostics=_diagnostics(row, row.get(rb, "diagnostics", "", required=False)),
            routing=_routing(row, row.get(rb, "routing_accuracy", "", required=False)),
        ))
    return LifecycleMetrics(tuple(cycles), matrix, final, tuple(sources), passage_tasks)


# ---------------------------------------------------------------------------------------------
# Continual-learning metrics


@dataclass(frozen=True)
class CLMetrics:
    """Continual-learning metrics of an accuracy matrix ``R`` of ``T`` tasks (docs/design.md §5).

    - ``final_average_accuracy`` = mean_j R[T-1][j] over all T tasks.
    - ``average_incremental_accuracy`` = mean_i (mean_{j<=i} R[i][j]): the mean accuracy on the
      seen tasks, averaged over the cycles.
    - ``forgetting_per_task[j]`` = max_{j<=i<T-1} R[i][j] - R[T-1][j] for j < T-1: the best
      accuracy task j had before the last cycle minus its final accuracy (>= 0 unless
      the last cycle improved it beyond its best, then negative). ``forgetting`` is its mean.
    - ``backward_transfer_per_task[j]`` = R[T-1][j] - R[j][j] for j < T-1: the final accuracy
      minus the accuracy right after the task was learned (negative: forgetting).
      ``backward_transfer`` is its mean.

    The last task has no earlier cycle to forget from, so it is excluded from both; with one
    task (T = 1) both are None.
    """

    final_average_accuracy: float
    average_incremental_accuracy: float
    forgetting: float | None
    backward_transfer: float | None
    forgetting_per_task: dict[int, float]
    backward_transfer_per_task: dict[int, float]

    def to_json(self) -> dict[str, Any]:
        return {
            "final_average_accuracy": self.final_average_accuracy,
            "average_incremental_accuracy": self.average_incremental_accuracy,
            "forgetting": self.forgetting,
            "backward_transfer": self.backward_transfer,
            "forgetting_per_task": {str(k): v for k, v in self.forgetting_per_task.items()},
            "backward_transfer_per_task": {str(k): v for k, v in self.backward_transfer_per_task.items()},
        }


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values)


def continual_learning_metrics(matrix: Sequence[Sequence[float | None]], passage_tasks: Collection[int] = ()
                               ) -> CLMetrics:
    """Final average accuracy, average incremental accuracy, forgetting and backward transfer of ``R``.

    ``matrix`` is square ``(T, T)`` with numbers on and below the diagonal (entries above it
    are ignored). See :class:`CLMetrics` for the definitions. ``passage_tasks`` are periods
    that read plain passages only: they have no accuracy (their column is None) and the means
    run over the other tasks; every period stays a row.
    """
    t = len(matrix)
    if t == 0 or any(len(row) != t for row in matrix):
        raise ValueError(f"the accuracy matrix must be square and non-empty, got {[len(r) for r in matrix]} rows")
    tasks = [j for j in range(t) if j not in set(passage_tasks)]
    if not tasks:
        raise ValueError("no task with an accuracy: every period read plain passages only")
    for i, row in enumerate(matrix):
        for j in range(i + 1):
            if (row[j] is None) != (j in set(passage_tasks)):
                raise ValueError(f"accuracy_matrix[{i}][{j}] is {row[j]!r}: every labelled task seen after cycle {i} "
                                 "needs a value, and a task of passages only has none")
    r: list[dict[int, float]] = [{j: float(matrix[i][j]) for j in tasks if j <= i} for i in range(t)]  # type: ignore[arg-type]
    last = r[t - 1]
    forgetting = {j: max(r[i][j] for i in range(j, t - 1)) - last[j] for j in tasks if j < t - 1}
    bwt = {j: last[j] - r[j][j] for j in tasks if j < t - 1}
    return CLMetrics(
        final_average_accuracy=_mean(list(last.values())),
        average_incremental_accuracy=_mean([_mean(list(row.values())) for row in r if row]),
        forgetting=_mean(list(forgetting.values())) if forgetting else None,
        backward_transfer=_mean(list(bwt.values())) if bwt else None,
        forgetting_per_task=forgetting,
        backward_transfer_per_task=bwt,
    )


# ---------------------------------------------------------------------------------------------
# Figures (matplotlib's object API on the Agg canvas; no pyplot state)

_STYLE: dict[str, Any] = {
    "figure.dpi": DPI,
    "savefig.dpi": DPI,
    "font.family": "DejaVu Sans",  # bundled with matplotlib: the same glyphs on every machine
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "legend.fontsize": 8,
    "legend.frameon": False,
}
COLORS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c")


@contextlib.contextmanager
def figure_style() -> Iterator[None]:
    """Matplotlib's defaults plus the report's settings, whatever the user's matplotlibrc says."""
    with matplotlib.style.context(["default", _STYLE]):
        yield


def _figure() -> Figure:
    return Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")


def _empty(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=11, color="#666666")


def save_png(fig: Figure, dest: str | Path) -> Path:
    """Write ``fig`` as a PNG atomically, without the software tag, so reruns give identical bytes."""
    with figure_style(), atomic_path(dest) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, metadata={"Software": None})
    return Path(dest)


def _fmt(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def plot_accuracy_matrix(matrix: Sequence[Sequence[float | None]], passage_tasks: Collection[int] = ()) -> Figure:
    """Heatmap of ``R[i][j]`` (rows: after cycle i, columns: task j), each cell annotated."""
    t = len(matrix)
    cl = continual_learning_metrics(matrix, passage_tasks)
    with figure_style():
        fig = _figure()
        ax = fig.add_subplot()
        values = [[math.nan if j > i or matrix[i][j] is None else float(matrix[i][j]) for j in range(t)]
                  for i in range(t)]
        image = ax.imshow(values, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_facecolor("#f2f2f2")  # unseen cells (NaN) show the background
        cbar = fig.colorbar(image, ax=ax)
        cbar.set_label("accuracy")
        if t <= 12:
            size = 9 if t <= 6 else 7
            for i in range(t):
                for j in range(t):
                    v = values[i][j]
                    if math.isnan(v):
                        ax.text(j, i, "–", ha="center", va="center", color="#999999", fontsize=size)
                    else:
                        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=size,
                                color="white" if v < 0.6 else "black")
        ticks = range(t)
        ax.set_xticks(ticks, [str(j) for j in ticks])
        ax.set_yticks(ticks, [str(i) for i in ticks])
        ax.set_xlabel("task j")
        ax.set_ylabel("after the sleep of cycle i")
        ax.spines[:].set_visible(False)
        ax.set_title(
            f"Accuracy matrix R[i][j]\nfinal average {cl.final_average_accuracy:.2f} · "
            f"forgetting {_fmt(cl.forgetting)} · backward transfer {_fmt(cl.backward_transfer)}"
        )
    return fig


def plot_task_accuracy(matrix: Sequence[Sequence[float | None]]) -> Figure:
    """Accuracy of each task after each cycle (from the cycle it is learned), and the mean on seen tasks."""
    t = len(matrix)
    with figure_style():
        fig = _figure()
        ax = fig.add_subplot()
        cycles = list(range(t))
        for j in range(t):
            xs = [i for i in range(j, t) if matrix[i][j] is not None]
            if xs:  # a period of plain passages only has no accuracy to draw
                ax.plot(xs, [matrix[i][j] for i in xs], marker="o", color=COLORS[j % len(COLORS)],
                        label=f"task {j}", linewidth=1.6)
        seen = {i: [float(v) for v in matrix[i][: i + 1] if v is not None] for i in cycles}
        xs = [i for i in cycles if seen[i]]
        ax.plot(xs, [_mean(seen[i]) for i in xs], linestyle="--", color="black", marker="s", markersize=4,
                linewidth=1.2, label="mean on seen tasks")
        ax.set_xticks(cycles)
        ax.set_xlim(-0.25, max(t - 1, 1) + 0.25)
        ax.set_ylim(-0.03, 1.05)
        ax.set_xlabel("cycle (accuracy after its sleep)")
        ax.set_ylabel("accuracy")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(loc="lower left", ncols=2 if t > 4 else 1)
        ax.set_title("Accuracy of each task over the cycles")
    return fig


def plot_dream_funnel(funnels: Sequence[DreamFunnel | None]) -> Figure:
    """Grouped bars per cycle: dreams generated / selected / rewarded / passed gate / promoted / rejected.

    ``funnels[i]`` is cycle i's funnel, or None (no dreaming): the cycle is labelled "none".
    """
    with figure_style():
        fig = _figure()
        ax = fig.add_subplot()
        n = len(funnels)
        width = 0.8 / len(FUNNEL_STAGES)
        top = max([f.stage(s) or 0 for f in funnels if f is not None for s in FUNNEL_STAGES], default=0)
        for k, stage in enumerate(FUNNEL_STAGES):
            xs, ys = [], []
            for i, f in enumerate(funnels):
                v = f.stage(stage) if f is not None else None
                if v is not None:
                    xs.append(i - 0.4 + width * (k + 0.5))
                    ys.append(v)
            bars = ax.bar(xs, ys, width=width, color=COLORS[k], label=stage.replace("_", " "))
            if n <= 8:
                ax.bar_label(bars, fontsize=7, padding=1)
        for i, f in enumerate(funnels):
            if f is None:
                ax.text(i, max(top, 1) * 0.04, NONE, ha="center", va="bottom", color="#666666")
        ax.set_xticks(range(n), [f"cycle {i}" for i in range(n)])
        ax.set_xlim(-0.6, n - 0.4)
        ax.set_ylim(0, max(top, 1) * 1.15)
        ax.set_ylabel("dreams")
        if top == 0 and all(f is None for f in funnels):
            ax.set_yticks([])
            _empty(ax, "no dreams in any cycle")
        else:
            ax.legend(loc="upper left", ncols=3)
        ax.set_title("Dream funnel per sleep")
    return fig


def plot_diagnostics(cycles: Sequence["Cycle"]) -> Figure:
    """Where forgetting happens: mean accuracy of the earlier tasks and of the cycle's own task in each
    state of every cycle (DIAGNOSTIC_STATES), among all labels seen so far."""
    with figure_style():
        fig = _figure()
        ax = fig.add_subplot()
        measured = [c for c in cycles if c.diagnostics]
        if not measured:
            _empty(ax, "no diagnostics (lifecycle.diagnostics false)")
            return fig
        states = [n for n, _ in DIAGNOSTIC_STATES]
        x = 0
        ticks, names = [], []
        for c in measured:
            for k, state in enumerate(states):
                accs = c.diagnostics.get(state)
                if accs is None:
                    continue
                old = [a for t, a in accs.items() if t < c.period]
                new = accs.get(c.period)
                if old:
                    ax.bar(x - 0.2, sum(old) / len(old), width=0.4, color=COLORS[0],
                           label="earlier tasks (mean)" if x == 0 or not ticks else None)
                if new is not None:
                    ax.bar(x + 0.2, new, width=0.4, color=COLORS[1], label="this cycle's task" if not ticks else None)
                ticks.append(x)
                names.append(f"{c.period}: {state.replace('after_', '').replace('_', ' ')}")
                x += 1
            x += 0.6
        handles, labels = ax.get_legend_handles_labels()
        uniq = dict(zip(labels, handles))
        ax.legend(uniq.values(), uniq.keys(), loc="upper right", fontsize=7)
        ax.set_xticks(ticks, names, rotation=60, ha="right", fontsize=6)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("accuracy among all seen labels")
        ax.set_title("Where forgetting happens: each state of each cycle")
    return fig


# ---------------------------------------------------------------------------------------------
# The summary, the markdown, the tables for dvc plots


def summarize(metrics: LifecycleMetrics) -> dict[str, Any]:
    """A JSON-serialisable summary: one row per cycle plus the continual-learning metrics."""
    cl = continual_learning_metrics(metrics.accuracy_matrix, metrics.passage_tasks)
    cycles = []
    for c in metrics.cycles:
        cycles.append({
            "cycle": c.period,
            "accuracy": {str(k): v for k, v in c.accuracy.items()},
            "mean_accuracy_seen": c.mean_accuracy_seen,
            "wake_loss_first": c.wake_loss_first,
            "wake_loss_last": c.wake_loss_last,
            "consolidations": [
                {"src": x.src, "dst": x.dst, "slot": x.slot, "retention_loss": x.retention_loss,
                 "accuracy_ratio": x.accuracy_ratio}
                for x in c.consolidations
            ],
            "dreaming": c.dreaming,
            "dream_funnel": (
                {s: c.dream_funnel.stage(s) for s in FUNNEL_STAGES} if c.dream_funnel is not None else None
            ),
            "dreams_promoted": c.dreams_promoted,
        })
    return {
        "n_tasks": metrics.n_tasks,
        "accuracy_matrix": [list(r) for r in metrics.accuracy_matrix],
        "continual_learning": cl.to_json(),
        "cycles": cycles,
    }


def _acc(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str | None = None) -> list[str]:
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    return ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |",
            *("| " + " | ".join(r) + " |" for r in rows)]


def _consolidation_brief(c: Cycle) -> str:
    if not c.consolidations:
        return NONE
    return "; ".join(f"{_md(x.src)}→{_md(x.dst)} (slot {x.slot}, retention {_fmt(x.retention_loss)})"
                     for x in c.consolidations)


def _dreams_brief(c: Cycle) -> str:
    if c.dream_funnel is None:
        return NONE if c.dreaming != "off" else f"{NONE} (dreaming off)"
    return f"{c.dream_funnel.promoted} of {c.dream_funnel.generated}"


def render_markdown(
    metrics: LifecycleMetrics, out_dir: str | Path | None = None, root: str | Path | None = None
) -> str:
    """The report as markdown; links (figures, gate reports) are relative to ``out_dir``."""
    cl = continual_learning_metrics(metrics.accuracy_matrix, metrics.passage_tasks)
    t = metrics.n_tasks
    tasks = range(t)
    out = Path(out_dir) if out_dir is not None else None

    def link(path: Path) -> str:
        return Path(os.path.relpath(path, out)).as_posix() if out is not None else path.as_posix()

    lines = [
        "# Lifecycle report",
        "",
        f"{len(metrics.cycles)} wake/sleep cycles over {t} tasks. Final average accuracy "
        f"**{cl.final_average_accuracy:.3f}**, forgetting **{_fmt(cl.forgetting, 3)}**, backward transfer "
        f"**{_fmt(cl.backward_transfer, 3)}** (definitions below).",
        "",
        "## Cycles",
        "",
        "Accuracy on each seen task after the cycle's sleep (class-incremental: among all labels seen so far).",
        "",
    ]
    lines += _table(
        ["cycle", *(f"task {j}" for j in tasks), "mean (seen)", "wake loss first → last", "consolidations",
         "dreams promoted"],
        [
            [str(c.period), *(_acc(c.accuracy.get(j)) for j in tasks), _acc(c.mean_accuracy_seen),
             f"{c.wake_loss_first:.3f} → {c.wake_loss_last:.4f}", _consolidation_brief(c), _dreams_brief(c)]
            for c in metrics.cycles
        ],
        align="l" + "r" * (t + 2) + "ll",
    )
    lines += [
        "",
        "## Accuracy matrix",
        "",
        "R[i][j]: accuracy on task j after the sleep of cycle i (– : not learned yet).",
        "",
    ]
    lines += _table(["after cycle", *(f"task {j}" for j in tasks)],
                    [[str(i), *(_acc(v) for v in row)] for i, row in enumerate(metrics.accuracy_matrix)])
    lines += ["", f"![Accuracy matrix]({FIGURES['accuracy_matrix']})", ""]
    lines += ["## Continual-learning metrics", "", "T tasks; the last task is excluded from forgetting "
              "and backward transfer (it has no earlier cycle to forget from).", ""]
    lines += _table(["metric", "value", "definition"], [
        ["final average accuracy", f"{cl.final_average_accuracy:.3f}", "mean over j of R[T-1][j]"],
        ["average incremental accuracy", f"{cl.average_incremental_accuracy:.3f}",
         "mean over i of (mean over j ≤ i of R[i][j])"],
        ["forgetting", _fmt(cl.forgetting, 3),
         "mean over j < T-1 of (max over j ≤ i < T-1 of R[i][j]) - R[T-1][j]"],
        ["backward transfer", _fmt(cl.backward_transfer, 3), "mean over j < T-1 of R[T-1][j] - R[j][j]"],
        ["final mean accuracy (lifecycle.json)", f"{metrics.final_mean_accuracy:.3f}", "as written by the lifecycle"],
    ], align="lrl")
    if cl.forgetting_per_task:
        lines += [""]
        r = metrics.accuracy_matrix
        lines += _table(["task", "just learned R[j][j]", "best before the last cycle", "final R[T-1][j]",
                         "forgetting", "backward transfer"], [
            [str(j), _acc(r[j][j]), _acc(max(r[i][j] for i in range(j, t - 1))), _acc(r[t - 1][j]),  # type: ignore[type-var]
             f"{cl.forgetting_per_task[j]:.3f}", f"{cl.backward_transfer_per_task[j]:.3f}"]
            for j in cl.forgetting_per_task
        ])
    lines += ["", f"![Accuracy of each task over the cycles]({FIGURES['task_accuracy']})", ""]

    lines += ["## Consolidations", ""]
    rows = []
    for c in metrics.cycles:
        if not c.consolidations:
            rows.append([str(c.period), NONE, "–"])
        for x in c.consolidations:
            rows.append([str(c.period), f"{_md(x.src)} → {_md(x.dst)}", str(x.slot)])
    lines += _table(["cycle", "levels", "slot"], rows, align="llr")
    lines += ["", "## Where forgetting happens", "",
              "Accuracy of every seen task among all labels seen so far, in each state of a cycle: "
              + "; ".join(f"*{n.replace('_', ' ')}*: {d}" for n, d in DIAGNOSTIC_STATES) + ".", ""]
    rows = []
    for c in metrics.cycles:
        for state, _ in DIAGNOSTIC_STATES:
            accs = c.diagnostics.get(state)
            if accs is not None:
                rows.append([str(c.period), state.replace("_", " "),
                             *(_acc(accs[j]) if j in accs else "–" for j in range(metrics.n_tasks))])
    if rows:
        lines += _table(["cycle", "state", *(f"task {j}" for j in range(metrics.n_tasks))], rows,
                        align="ll" + "r" * metrics.n_tasks)
        lines += ["", f"![Where forgetting happens]({FIGURES['diagnostics']})", ""]
    else:
        lines += ["Not measured (`lifecycle.diagnostics` false).", ""]
    lines += ["## Routing", "", "Share of each seen task's test inputs that prototype routing sends to the task's own "
              "period after the sleep (an input sent to an earlier period meets experts that never learned its task).", ""]
    rows = [[str(c.period), *(_acc(c.routing[j]) if j in c.routing else "–" for j in range(metrics.n_tasks))]
            for c in metrics.cycles if c.routing]
    if rows:
        lines += _table(["cycle", *(f"task {j}" for j in range(metrics.n_tasks))], rows, align="l" + "r" * metrics.n_tasks)
        lines += [""]
    else:
        lines += ["No prototype routing (`cms.routing.by_prototype` false): every expert answers every input.", ""]

    lines += ["## Dreams", "", "The funnel of each sleep's dreams; rejected = not promoted (failed a gate check "
              "or not rewarded).", ""]
    rows = []
    for c in metrics.cycles:
        gate = "–"
        if c.gate is not None:
            reasons = ", ".join(f"{k} {v}" for k, v in c.gate.failing.items()) or "no check failed"
            gate = reasons + (f" ([gate report]({link(c.gate.report_md)}))" if c.gate.report_md else "")
        if c.dream_funnel is None:
            rows.append([str(c.period), _dreams_brief(c), *["–"] * (len(FUNNEL_STAGES) - 1), gate])
        else:
            rows.append([str(c.period), *(str(v) if (v := c.dream_funnel.stage(s)) is not None else "–"
                                          for s in FUNNEL_STAGES), gate])
    lines += _table(["cycle", *(s.replace("_", " ") for s in FUNNEL_STAGES), "gate: failing checks"], rows,
                    align="l" + "r" * len(FUNNEL_STAGES) + "l")
    lines += ["", f"![Dream funnel]({FIGURES['dream_funnel']})", ""]

    if metrics.sources:
        base = Path(root) if root is not None else None
        lines += ["## Sources", "", *(f"- `{_show(p, base)}`" for p in metrics.sources), ""]
    return "\n".join(lines).rstrip("\n") + "\n"


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


def write_report(
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
        "report": _show(out / REPORT_MD, root),
        "figures": {k: _show(out / name, root) for k, name in FIGURES.items()},
        "plots": {k: _show(p, root) for k, p in tables.items()},
        "metrics": _show(cl_path, root),
    }
    return summary


def print_summary_table(summary: dict[str, Any], console: Console | None = None) -> None:
    """Print the summary (from :func:`write_report` or :func:`summarize`) as a table, one row per cycle."""
    console = console or Console()
    n = summary["n_tasks"]
    table = Table(title="lm-sleep lifecycle: accuracy after each sleep", title_justify="left")
    table.add_column("cycle", justify="right")
    for j in range(n):
        table.add_column(f"task {j}", justify="right")
    table.add_column("mean\n(seen)", justify="right", style="bold")
    table.add_column("consolidated\n(retention)", no_wrap=True)
    table.add_column("dreams\npromoted", justify="right")
    for c in summary["cycles"]:
        acc = c["accuracy"]
        cons = "; ".join(f"{x['src']}→{x['dst']} {_fmt(x['retention_loss'])}" for x in c["consolidations"]) or NONE
        funnel = c["dream_funnel"]
        dreams = f"{funnel['promoted']} of {funnel['generated']}" if funnel else (
            f"{NONE} (off)" if c.get("dreaming") == "off" else NONE)
        table.add_row(str(c["cycle"]), *(f"{acc[str(j)]:.2f}" if str(j) in acc else "–" for j in range(n)),
                      _fmt(c["mean_accuracy_seen"]), cons, dreams)
    cl = summary["continual_learning"]
    console.print(table)
    console.print(f"final average accuracy {cl['final_average_accuracy']:.3f} · forgetting "
                  f"{_fmt(cl['forgetting'], 3)} · backward transfer {_fmt(cl['backward_transfer'], 3)}")
    if "files" in summary:
        console.print(f"report: {summary['files']['report']}")


# ---------------------------------------------------------------------------------------------
# Prefect


def _retry_on_os_error(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Retry only transient filesystem errors, never a missing or malformed metrics file (ReportError)."""
    return isinstance(state.result(raise_on_failure=False), OSError)


@task(retries=2, retry_delay_seconds=1, retry_condition_fn=_retry_on_os_error, cache_policy=NO_CACHE)
def report_task(root: Path, params: Params, out_dir: Path | None = None) -> dict[str, Any]:
    """Write the lifecycle report (markdown + PNGs), the dvc plot tables and the CL metrics; return the summary."""
    return write_report(root, params, out_dir)
