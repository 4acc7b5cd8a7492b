"""Great Expectations plumbing shared by the stream's and the dreams' suites: an ephemeral GX context (nothing
written to disk by GX), one whole-dataframe batch per suite, ``COMPLETE`` results, and failing rows named by an
id column so a report can be traced back to its table."""

from __future__ import annotations

import json
import os
from typing import Any

import pandas as pd

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

#: Failing rows shown per check in a report.
EXAMPLES_SHOWN = 10


def json_value(value: Any) -> Any:
    """Turn numpy/pandas scalars and missing values into plain JSON values."""
    if value is None:
        return None
    if hasattr(value, "item") and not isinstance(value, (list, dict, str)):
        value = value.item()
    if isinstance(value, float) and value != value:
        return None
    return value


def gx_source(name: str) -> Any:
    """A pandas data source on a fresh ephemeral GX context (nothing on disk, no progress bars)."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    return context.data_sources.add_pandas(name)


def complete_results(id_column: str | None) -> dict[str, Any]:
    """COMPLETE results; failing rows identified by ``id_column`` (or the index without one)."""
    result_format: dict[str, Any] = {"result_format": "COMPLETE"}
    if id_column is not None:
        result_format["unexpected_index_column_names"] = [id_column]
    return result_format


def run_suite(
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


def failing_ids(result: Any, id_column: str | None) -> list[Any]:
    """Unique failing row ids of a GX result: ``id_column`` values, or index labels without one."""
    res = result.result or {}
    if id_column is not None:
        ids = [json_value(d[id_column]) for d in res.get("unexpected_index_list") or []]
    else:
        ids = [json_value(i) for i in res.get("unexpected_index_list") or []]
    return list(dict.fromkeys(ids))


def texts_by_row_id(df: pd.DataFrame) -> dict[Any, Any]:
    """Map row_id (or index, without a row_id column) to text for failure examples."""
    if "text" not in df.columns:
        return {}
    keys = df["row_id"] if "row_id" in df.columns else df.index.to_series()
    return {json_value(k): json_value(t) for k, t in zip(keys, df["text"], strict=True)}


def exception_message(info: Any) -> str | None:
    """The first exception message in GX's flat or per-metric exception_info, if any."""
    if not isinstance(info, dict):
        return None
    if info.get("raised_exception"):
        return str(info.get("exception_message"))
    for sub in info.values():
        if isinstance(sub, dict) and sub.get("raised_exception"):
            return str(sub.get("exception_message"))
    return None


def check_entry(result: Any, has_row_id: bool, texts: dict[Any, Any]) -> dict[str, Any]:
    """One JSON-ready check dict from a GX expectation validation result."""
    config = result.expectation_config
    kwargs = config.kwargs
    column = kwargs.get("column") or (
        f"{kwargs['column_A']},{kwargs['column_B']}" if "column_A" in kwargs else None
    )
    error = exception_message(result.exception_info)
    res = result.result or {}
    row_ids = failing_ids(result, "row_id" if has_row_id else None)
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
    source = gx_source(name)
    results = run_suite(source, name, frame, entries, complete_results(id_column), suite_name=name)
    out: dict[str, list[Any]] = {}
    for r in results:
        ids = failing_ids(r, id_column)
        out[r.expectation_config.meta["check"]] = ids if (ids or r.success) else [None]
    return out
