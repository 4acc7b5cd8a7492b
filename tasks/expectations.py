"""Great Expectations suite for the class-incremental stream built by ``prepare``.

Every check is a named GX expectation run on the in-memory stream (an ephemeral
context, nothing written to disk by GX). Failing rows are reported by their
``row_id`` so a report can be traced back to ``stream.parquet``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from model.data import STREAM_COLUMNS

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

STREAM_DTYPES = {"row_id": "int64", "task": "int64", "split": "str", "text": "str", "label": "str"}
SPLITS = ["train", "test"]
LABEL_TASKS_COLUMN = "label_task_count"
EXAMPLES_SHOWN = 10


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


class StreamValidationError(ValueError):
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


# Dataset and dream text in a Markdown report must stay text in any renderer (some pass raw HTML through):
# no tag (`<`, `>`, `&` as entities), no link syntax (`[`, `]`, and the backslash, so an escape cannot be undone),
# no cell or line break.
_MD_ESCAPES = str.maketrans({"\\": "\\\\", "|": "\\|", "[": "\\[", "]": "\\]", "&": "&amp;", "<": "&lt;", ">": "&gt;",
                             "\n": " ", "\r": " "})


def _md(text: str) -> str:
    """Text for one line (or table cell) of a Markdown report: inert in any renderer (see _MD_ESCAPES)."""
    return text.translate(_MD_ESCAPES)


def _json_value(value: Any) -> Any:
    """Turn numpy/pandas scalars and missing values into plain JSON values."""
    if value is None:
        return None
    if hasattr(value, "item") and not isinstance(value, (list, dict, str)):
        value = value.item()
    if isinstance(value, float) and value != value:
        return None
    return value


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
    source = _gx_source("prepare")
    frames = {"stream": df, "labels": _label_tasks(df)}
    has_row_id = "row_id" in df.columns
    result_format = _result_format("row_id" if has_row_id else None)

    suite = _expectations(plan)
    texts = _texts_by_row_id(df)
    checks: list[dict[str, Any]] = []
    for batch_name, frame in frames.items():
        entries = [(name, e) for name, b, e in suite if b == batch_name]
        results = _run_suite(source, batch_name, frame, entries, result_format, suite_name=f"stream_{batch_name}")
        checks += [_check_entry(r, has_row_id, texts) for r in results]
    return StreamValidation(success=all(c["success"] for c in checks), checks=checks)


def _gx_source(name: str) -> Any:
    """A pandas data source on a fresh ephemeral GX context (nothing on disk, no progress bars)."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    return context.data_sources.add_pandas(name)


def _result_format(id_column: str | None) -> dict[str, Any]:
    """COMPLETE results; failing rows identified by ``id_column`` (or the index without one)."""
    result_format: dict[str, Any] = {"result_format": "COMPLETE"}
    if id_column is not None:
        result_format["unexpected_index_column_names"] = [id_column]
    return result_format


def _run_suite(
    source: Any,
    asset_name: str,
    frame: pd.DataFrame,
    entries: list[tuple[str, Any]],
    result_format: dict[str, Any],
    suite_name: str,
) -> list[Any]:
    """Validate ``frame`` as one whole-dataframe batch against named expectations.

    ``entries`` are (check name, expectation); each expectation's ``meta`` gets its
    check name (``meta["check"]``) and position. Results come back in entry order.
    """
    import great_expectations as gx

    gx_suite = gx.ExpectationSuite(name=suite_name)
    for i, (name, expectation) in enumerate(entries):
        expectation.meta = {"check": name, "order": i}
        gx_suite.add_expectation(expectation)
    batch = (
        source.add_dataframe_asset(asset_name)
        .add_batch_definition_whole_dataframe("all")
        .get_batch(batch_parameters={"dataframe": frame})
    )
    result = batch.validate(gx_suite, result_format=result_format)
    return sorted(result.results, key=lambda r: r.expectation_config.meta["order"])


def _failing_ids(result: Any, id_column: str | None) -> list[Any]:
    """Unique failing row ids of a GX result: ``id_column`` values, or index labels without one."""
    res = result.result or {}
    if id_column is not None:
        ids = [_json_value(d[id_column]) for d in res.get("unexpected_index_list") or []]
    else:
        ids = [_json_value(i) for i in res.get("unexpected_index_list") or []]
    return list(dict.fromkeys(ids))


def _texts_by_row_id(df: pd.DataFrame) -> dict[Any, Any]:
    """Map row_id (or index, without a row_id column) to text for failure examples."""
    if "text" not in df.columns:
        return {}
    keys = df["row_id"] if "row_id" in df.columns else df.index.to_series()
    return {_json_value(k): _json_value(t) for k, t in zip(keys, df["text"], strict=True)}


def _exception_message(info: Any) -> str | None:
    """The first exception message in GX's flat or per-metric exception_info, if any."""
    if not isinstance(info, dict):
        return None
    if info.get("raised_exception"):
        return str(info.get("exception_message"))
    for sub in info.values():
        if isinstance(sub, dict) and sub.get("raised_exception"):
            return str(sub.get("exception_message"))
    return None


def _check_entry(result: Any, has_row_id: bool, texts: dict[Any, Any]) -> dict[str, Any]:
    """One JSON-ready check dict from a GX expectation validation result."""
    config = result.expectation_config
    kwargs = config.kwargs
    column = kwargs.get("column") or (
        f"{kwargs['column_A']},{kwargs['column_B']}" if "column_A" in kwargs else None
    )
    error = _exception_message(result.exception_info)
    res = result.result or {}
    row_ids = _failing_ids(result, "row_id" if has_row_id else None)
    observed = res.get("observed_value")
    return {
        "name": config.meta["check"],
        "expectation": config.type,
        "column": column,
        "success": bool(result.success),
        "failing_count": len(row_ids),
        "failing_row_ids": row_ids,
        "examples": [{"row_id": r, "text": texts.get(r)} for r in row_ids[:EXAMPLES_SHOWN]],
        "observed": json.loads(json.dumps(observed, default=str)) if observed is not None else None,
        "error": error,
    }


def failing_rows(name: str, frame: pd.DataFrame, entries: list[tuple[str, Any]], id_column: str
                 ) -> dict[str, list[Any]]:
    """Run named expectations on ``frame``; return {check name: ids (``id_column``) of the rows that fail it}.

    A check that fails on no row (or fails as a whole, e.g. a missing column) maps to [] and to the
    sentinel id ``None`` respectively."""
    source = _gx_source(name)
    results = _run_suite(source, name, frame, entries, _result_format(id_column), suite_name=name)
    out: dict[str, list[Any]] = {}
    for r in results:
        ids = _failing_ids(r, id_column)
        out[r.expectation_config.meta["check"]] = ids if (ids or r.success) else [None]
    return out
