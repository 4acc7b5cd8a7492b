"""The Great Expectations suite of the class-incremental stream built by ``prepare``.

Every check is a named GX expectation run on the in-memory stream (an ephemeral
context, nothing written to disk by GX). Failing rows are reported by their
``row_id`` so a report can be traced back to ``stream.parquet``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from checks.suite import check_entry, complete_results, gx_source, run_suite, texts_by_row_id
from model.data.stream import STREAM_COLUMNS
from model.errors import UserError
from reporting import escape_md as _md  # text inert in any Markdown renderer

STREAM_DTYPES = {"row_id": "int64", "task": "int64", "split": "str", "text": "str", "label": "str"}
SPLITS = ["train", "test"]
LABEL_TASKS_COLUMN = "label_task_count"


@dataclass
class StreamValidation:
    """Outcome of the stream suite: overall success and one entry per expectation."""

    success: bool
    checks: list[dict[str, Any]] = field(default_factory=list)

    @property
    def failed(self) -> list[dict[str, Any]]:
        """The checks that did not pass."""
        return [c for c in self.checks if not c["success"]]

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (for ``reports/prepare/validation.json``)."""
        return {
            "success": self.success,
            "n_checks": len(self.checks),
            "n_failed": len(self.failed),
            "failed_checks": sorted({c["name"] for c in self.failed}),
            "checks": self.checks,
        }

    def to_markdown(self) -> str:
        """A human-readable report: a table of checks, then examples of failing rows."""
        status = "PASSED" if self.success else "FAILED"
        lines = [
            "# Stream validation",
            "",
            f"**{status}**: {len(self.checks) - len(self.failed)} of {len(self.checks)} expectations passed.",
            "",
            "| check | expectation | column | result | failing rows |",
            "| --- | --- | --- | --- | --- |",
        ]
        for c in self.checks:
            result = "pass" if c["success"] else "FAIL"
            lines.append(
                f"| {c['name']} | `{c['expectation']}` | {c['column'] or ''} | {result} | {c['failing_count']} |"
            )
        for c in self.failed:
            lines += ["", f"## {c['name']}: `{c['expectation']}` ({c['column'] or 'table'})", ""]
            if c["error"]:
                lines.append(f"Error: {_md(c['error'])}")
            if c["observed"] is not None:
                lines.append(f"Observed: `{_md(json.dumps(c['observed'], default=str))}`")
            for ex in c["examples"]:
                lines.append(f"- row_id {ex['row_id']}: {_md(repr(ex['text']))}")
            if c["failing_count"] > len(c["examples"]):
                lines.append(f"- ... and {c['failing_count'] - len(c['examples'])} more")
        return "\n".join(lines) + "\n"


class StreamValidationError(UserError, ValueError):
    """The stream failed its expectation suite; the message names checks, rows and the report."""

    def __init__(self, validation: StreamValidation, report_path: str) -> None:
        self.validation = validation
        self.report_path = report_path
        parts = [f"stream validation failed ({len(validation.failed)} of {len(validation.checks)} expectations):"]
        for c in validation.failed:
            where = f" on {c['column']}" if c["column"] else ""
            parts.append(f"  {c['name']} ({c['expectation']}{where}): {c['failing_count']} failing row(s)")
            if c["error"]:
                parts.append(f"    error: {c['error']}")
            if c["observed"] is not None and not c["examples"]:
                parts.append(f"    observed: {json.dumps(c['observed'], default=str)}")
            for ex in c["examples"]:
                parts.append(f"    row_id {ex['row_id']}: {ex['text']!r}")
        parts.append(f"full report: {report_path}")
        super().__init__("\n".join(parts))


def _expectations(plan: dict[int, list[str]]) -> list[tuple[str, str, Any]]:
    """The suite as (check name, batch, expectation); batch is 'stream' or 'labels'."""
    import great_expectations as gx

    ex = gx.expectations
    pairs = sorted((int(task), str(label)) for task, labels in plan.items() for label in labels)
    out: list[tuple[str, str, Any]] = [
        ("schema", "stream", ex.ExpectTableColumnsToMatchOrderedList(column_list=list(STREAM_COLUMNS))),
    ]
    out += [
        ("schema", "stream", ex.ExpectColumnValuesToBeOfType(column=col, type_=dtype))
        for col, dtype in STREAM_DTYPES.items()
    ]
    out += [
        ("row_id_unique", "stream", ex.ExpectColumnValuesToBeUnique(column="row_id")),
        ("text_not_null", "stream", ex.ExpectColumnValuesToNotBeNull(column="text")),
        ("text_not_blank", "stream", ex.ExpectColumnValuesToMatchRegex(column="text", regex=r"\S")),
        ("label_in_task", "stream", ex.ExpectColumnPairValuesToBeInSet(
            column_A="task", column_B="label", value_pairs_set=pairs)),
        ("split_in_set", "stream", ex.ExpectColumnValuesToBeInSet(column="split", value_set=SPLITS)),
        ("text_unique", "stream", ex.ExpectColumnValuesToBeUnique(column="text")),
        ("task_in_plan", "stream", ex.ExpectColumnValuesToBeInSet(
            column="task", value_set=sorted(int(t) for t in plan))),
        ("tasks_disjoint", "labels", ex.ExpectColumnValuesToBeBetween(
            column=LABEL_TASKS_COLUMN, min_value=1, max_value=1)),
    ]
    return out


def _label_tasks(df: pd.DataFrame) -> pd.DataFrame:
    """Per row: its row_id, label and how many distinct tasks that label appears in."""
    out = pd.DataFrame({"row_id": df["row_id"] if "row_id" in df.columns else pd.Series(range(len(df)))})
    if "label" in df.columns and "task" in df.columns:
        out["label"] = df["label"].to_numpy()
        out[LABEL_TASKS_COLUMN] = df.groupby("label", dropna=False)["task"].transform("nunique").to_numpy()
    return out


def validate_stream(df: pd.DataFrame, plan: dict[int, list[str]]) -> StreamValidation:
    """Run the stream suite on ``df`` against ``plan`` and collect per-check results."""
    source = gx_source("prepare")
    frames = {"stream": df, "labels": _label_tasks(df)}
    has_row_id = "row_id" in df.columns
    fmt = complete_results("row_id" if has_row_id else None)

    suite = _expectations(plan)
    texts = texts_by_row_id(df)
    checks: list[dict[str, Any]] = []
    for batch_name, frame in frames.items():
        entries = [(name, e) for name, b, e in suite if b == batch_name]
        results = run_suite(source, batch_name, frame, entries, fmt, suite_name=f"stream_{batch_name}")
        checks += [check_entry(r, has_row_id, texts) for r in results]
    return StreamValidation(success=all(c["success"] for c in checks), checks=checks)


__all__ = ["StreamValidation", "StreamValidationError", "validate_stream"]
