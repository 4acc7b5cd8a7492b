"""Reading a lifecycle run's metrics files, with errors that name the file and the field."""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Collection
from pathlib import Path
from typing import Any

from model.config import Params
from model.evaluation.continual import DIAGNOSTIC_STATES
from reporting.lifecycle.records import (
    FUNNEL_REQUIRED,
    NONE,
    Consolidation,
    Cycle,
    DreamFunnel,
    GateSummary,
    HeldOut,
    LifecycleMetrics,
    ReportError,
)


def show_path(path: Path, root: Path | None) -> str:
    """``path`` relative to ``root`` when it lies under it (how the report names a file), else as given."""
    if root is not None:
        with contextlib.suppress(ValueError):
            return str(path.resolve().relative_to(root.resolve()))
    return str(path)


class _File:
    """A parsed JSON file and the helpers that check its fields, naming the file on failure."""

    def __init__(self, path: Path, root: Path | None, data: Any) -> None:
        self.path, self.name, self.data = path, show_path(path, root), data

    @classmethod
    def read(cls, path: Path, root: Path | None, *, required: bool, hint: str = "") -> _File | None:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            if required:
                raise ReportError(f"{show_path(path, root)}: file not found{hint}") from None
            return None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ReportError(f"{show_path(path, root)}: not valid JSON: {e}") from None
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
