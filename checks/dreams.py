"""The dream gate (docs/design.md §3 step 5): a Great Expectations suite decides which dreams are promoted.

The suite runs on the dream table plus the derived columns of
:func:`model.sleep.dream_checks.add_check_columns` (one ephemeral GX context, one
whole-dataframe batch, ``COMPLETE`` results, failing rows named by ``dream_id``).
There is one named check per rule, each made of one or more expectations:

=====================  =====================================================================
check                  a dream fails it when
=====================  =====================================================================
``schema``             the table's columns are not exactly ``DREAM_COLUMNS + CHECK_COLUMNS``
                       (in order) with the expected dtypes, or its ``dream_id`` is null or
                       repeated, or its ``selection`` is not one of topk/random/none/all
``text_not_empty``     its text is null or has no non-whitespace character (regex ``\\S``)
``length_bounds``      ``n_tokens`` is null or outside ``[gate.min_tokens, gate.max_tokens]``
``not_near_duplicate`` ``dup_score >= gate.near_duplicate_threshold`` (or null)
``not_context_copy``   ``copy_score >= gate.copy_threshold`` (or null)
``importance_finite``  ``importance`` is NaN, +inf or -inf
``reward_valid``       ``reward`` is neither 0.0, 1.0 nor NaN (NaN: the dream was not tried)
=====================  =====================================================================

A table-level failure (a missing column, a whole column of the wrong dtype)
rejects every dream. Rejecting every dream is a normal outcome (``success`` is
False, nothing is promoted). An exception inside an expectation is not: it
raises :class:`DreamGateError` naming the check, unless the schema check has
already failed (then the table is malformed, the erroring check is recorded
as failed for every dream with its error message, and the report is still written).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from checks.suite import complete_results, exception_message, failing_ids, gx_source, json_value, run_suite
from model.config import DreamGateConfig
from model.io import write_json, write_text
from model.sleep.dream_checks import (
    CHECK_COLUMNS,
    CHECK_DTYPES,
    DREAM_COLUMNS,
    DREAM_DTYPES,
    SELECTIONS,
    add_check_columns,
)
from reporting import escape_md as _md  # text inert in any Markdown renderer


CHECKS: tuple[str, ...] = (
    "schema",
    "text_not_empty",
    "length_bounds",
    "not_near_duplicate",
    "not_context_copy",
    "importance_finite",
    "reward_valid",
)
ID_COLUMN = "dream_id"
PREVIEW_CHARS = 80
GATE_JSON = "gate.json"
GATE_MD = "gate.md"


class DreamGateError(RuntimeError):
    """An expectation of the dream gate raised inside Great Expectations (a gate bug, not bad dreams)."""

    def __init__(self, check: str, expectation: str, column: str | None, message: str) -> None:
        self.check = check
        self.expectation = expectation
        self.column = column
        self.message = message
        where = f" on column {column!r}" if column else ""
        super().__init__(
            f"dream gate check {check!r} could not be evaluated: {expectation}{where} raised inside "
            f"Great Expectations: {message}"
        )


@dataclass
class DreamValidation:
    """Outcome of the dream gate.

    ``checks`` has one entry per rule (in :data:`CHECKS` order): ``name``,
    ``expectation`` (its GX expectation types), ``success``, ``failing_count``,
    ``failing_dream_ids`` (row order), ``errors`` and ``expectations`` (per-expectation
    details). ``dreams`` has one entry per row: ``dream_id``, ``text``, ``reward``,
    ``failed_checks``. ``id_column`` is ``"dream_id"``, or None when the table has no
    such column (ids are then index labels).
    """

    success: bool
    checks: list[dict[str, Any]] = field(default_factory=list)
    dreams: list[dict[str, Any]] = field(default_factory=list)
    gate: dict[str, Any] = field(default_factory=dict)
    id_column: str | None = ID_COLUMN

    @property
    def failed(self) -> list[dict[str, Any]]:
        """The checks that did not pass."""
        return [c for c in self.checks if not c["success"]]

    @property
    def check(self) -> dict[str, dict[str, Any]]:
        """Checks by name."""
        return {c["name"]: c for c in self.checks}

    @property
    def rejected(self) -> list[dict[str, Any]]:
        """Dreams that failed at least one check."""
        return [d for d in self.dreams if d["failed_checks"]]

    @property
    def promoted(self) -> list[Any]:
        """Ids of dreams that passed every check and have reward 1.0."""
        return [d["dream_id"] for d in self.dreams if not d["failed_checks"] and d["reward"] == 1.0]

    def failed_checks_by_id(self) -> dict[Any, list[str]]:
        """Dream id (or index label) -> names of the checks it failed, in CHECKS order."""
        return {d["dream_id"]: d["failed_checks"] for d in self.dreams}

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (``gate.json``)."""
        n_rejected = len(self.rejected)
        return {
            "success": self.success,
            "gate": self.gate,
            "n_dreams": len(self.dreams),
            "n_passed": len(self.dreams) - n_rejected,
            "n_promoted": len(self.promoted),
            "n_rejected": n_rejected,
            "failed_checks": [c["name"] for c in self.failed],
            "checks": self.checks,
            "promoted": self.promoted,
            "rejected": [
                {"dream_id": d["dream_id"], "failed_checks": d["failed_checks"], "text": _preview(d["text"])}
                for d in self.rejected
            ],
        }

    def to_markdown(self) -> str:
        """A readable report: summary, table of checks, rejected dreams, failed expectations."""
        n, promoted, rejected = len(self.dreams), len(self.promoted), self.rejected
        unrewarded = n - promoted - len(rejected)
        status = "PASSED" if self.success else "FAILED"
        g = self.gate
        lines = [
            "# Dream gate",
            "",
            f"**{status}**: {n} dreams, {promoted} promoted, {len(rejected)} rejected"
            f" ({unrewarded} passed the gate without reward 1).",
            "",
        ]
        if g:
            lines += [
                f"Thresholds: n_tokens in [{g['min_tokens']}, {g['max_tokens']}]; near-duplicate at "
                f"dup_score >= {g['near_duplicate_threshold']}; context copy at copy_score >= {g['copy_threshold']}.",
                "",
            ]
        lines += ["| check | expectations | result | failing dreams |", "| --- | --- | --- | --- |"]
        for c in self.checks:
            result = "pass" if c["success"] else "FAIL"
            lines.append(f"| {c['name']} | {_md(_expectation_summary(c))} | {result} | {c['failing_count']} |")
        lines += ["", "## Rejected dreams", ""]
        if rejected:
            lines += [f"| {self.id_column or 'row'} | text (first {PREVIEW_CHARS} chars) | failed checks |",
                      "| --- | --- | --- |"]
            for d in rejected:
                lines.append(f"| {_md(str(d['dream_id']))} | {_md(_preview_md(d['text']))} | "
                             f"{'; '.join(d['failed_checks'])} |")
        else:
            lines.append("No dream was rejected.")
        failed_details = [(c["name"], e) for c in self.failed for e in c["expectations"] if not e["success"]]
        if failed_details:
            lines += ["", "## Failed expectations", ""]
            for name, e in failed_details:
                where = f" on `{e['column']}`" if e["column"] else ""
                scope = "every dream (table-level)" if e["table_level"] else f"{len(e['failing_dream_ids'])} dream(s)"
                line = f"- {name}: `{e['expectation']}`{where}: {scope}"
                if e["observed"] is not None:
                    line += f"; observed `{_md(json.dumps(e['observed'], default=str))}`"
                if e["error"]:
                    line += f"; error: {_md(e['error'])}"
                lines.append(line)
        return "\n".join(lines) + "\n"


def _preview(text: Any) -> Any:
    """The first PREVIEW_CHARS characters of a text (non-strings as JSON values)."""
    return text[:PREVIEW_CHARS] if isinstance(text, str) else json_value(text)


def _preview_md(text: Any) -> str:
    """Preview for Markdown: plain text, or its repr when empty/whitespace/not a string."""
    if isinstance(text, str) and text.strip():
        cut = text[:PREVIEW_CHARS]
        return cut + ("…" if len(text) > PREVIEW_CHARS else "")
    return f"`{_preview(text)!r}`"


def _expectation_summary(check: dict[str, Any]) -> str:
    """Distinct expectation types of a check, with a count where one repeats."""
    counts: dict[str, int] = {}
    for e in check["expectations"]:
        counts[e["expectation"]] = counts.get(e["expectation"], 0) + 1
    return ", ".join(f"`{t}`" + (f" x{k}" if k > 1 else "") for t, k in counts.items())


def _expectations(gate: DreamGateConfig) -> list[tuple[str, Any]]:
    """The suite as (check name, expectation), in report order."""
    import great_expectations as gx

    ex = gx.expectations
    big = sys.float_info.max
    dtypes = {**DREAM_DTYPES, **CHECK_DTYPES}
    out: list[tuple[str, Any]] = [
        ("schema", ex.ExpectTableColumnsToMatchOrderedList(column_list=[*DREAM_COLUMNS, *CHECK_COLUMNS])),
    ]
    out += [("schema", ex.ExpectColumnValuesToBeOfType(column=c, type_=t)) for c, t in dtypes.items()]
    out += [
        ("schema", ex.ExpectColumnValuesToNotBeNull(column=ID_COLUMN)),
        ("schema", ex.ExpectColumnValuesToBeUnique(column=ID_COLUMN)),
        ("schema", ex.ExpectColumnValuesToNotBeNull(column="selection")),
        ("schema", ex.ExpectColumnValuesToBeInSet(column="selection", value_set=list(SELECTIONS))),
        ("text_not_empty", ex.ExpectColumnValuesToNotBeNull(column="text")),
        ("text_not_empty", ex.ExpectColumnValuesToMatchRegex(column="text", regex=r"\S")),
        ("length_bounds", ex.ExpectColumnValuesToNotBeNull(column="n_tokens")),
        ("length_bounds", ex.ExpectColumnValuesToBeBetween(
            column="n_tokens", min_value=gate.min_tokens, max_value=gate.max_tokens)),
        ("not_near_duplicate", ex.ExpectColumnValuesToNotBeNull(column="dup_score")),
        ("not_near_duplicate", ex.ExpectColumnValuesToBeBetween(
            column="dup_score", min_value=0, max_value=gate.near_duplicate_threshold, strict_max=True)),
        ("not_context_copy", ex.ExpectColumnValuesToNotBeNull(column="copy_score")),
        ("not_context_copy", ex.ExpectColumnValuesToBeBetween(
            column="copy_score", min_value=0, max_value=gate.copy_threshold, strict_max=True)),
        # NaN is "null" to GX (caught by not-null); +-inf fall outside +-float max.
        ("importance_finite", ex.ExpectColumnValuesToNotBeNull(column="importance")),
        ("importance_finite", ex.ExpectColumnValuesToBeBetween(column="importance", min_value=-big, max_value=big)),
        # NaN (not tried) is ignored by in-set, as intended.
        ("reward_valid", ex.ExpectColumnValuesToBeInSet(column="reward", value_set=[0.0, 1.0])),
    ]
    return out


def validate_dreams(df: pd.DataFrame, gate: DreamGateConfig) -> DreamValidation:
    """Run the gate's GX suite on the dream table and collect per-check, per-dream results.

    ``df`` is the dream table, with or without the derived check columns (they are
    computed by :func:`add_check_columns` when any is missing). Raises
    :class:`DreamGateError` when an expectation raises inside GX on a table whose
    schema is valid.
    """
    if not set(CHECK_COLUMNS) <= set(df.columns):
        df = add_check_columns(df, gate)
    id_column = ID_COLUMN if ID_COLUMN in df.columns else None
    keys = df[id_column] if id_column else df.index.to_series()
    all_ids = [json_value(k) for k in keys]
    entries = _expectations(gate)
    results = run_suite(
        gx_source("dream_gate"), "dreams", df, entries, complete_results(id_column), suite_name="dream_gate"
    )

    details: list[dict[str, Any]] = []
    for r in results:
        config = r.expectation_config
        res = r.result or {}
        observed = res.get("observed_value")
        details.append({
            "check": config.meta["check"],
            "expectation": config.type,
            "column": config.kwargs.get("column"),
            "success": bool(r.success),
            "error": exception_message(r.exception_info),
            "failing_dream_ids": failing_ids(r, id_column),
            "observed": json.loads(json.dumps(observed, default=str)) if observed is not None else None,
            "table_level": False,
        })

    schema_failed = any(d["check"] == "schema" and not d["success"] and not d["error"] for d in details)
    for d in details:
        if d["error"] and not schema_failed:
            raise DreamGateError(d["check"], d["expectation"], d["column"], d["error"])
        if d["error"]:
            d["success"] = False  # never let an expectation that did not run count as passed
        if not d["success"] and (d["error"] or not d["failing_dream_ids"]):
            d["table_level"] = True
            d["failing_dream_ids"] = list(dict.fromkeys(all_ids))

    checks: list[dict[str, Any]] = []
    for name in CHECKS:
        mine = [d for d in details if d["check"] == name]
        failing = {i for d in mine for i in d["failing_dream_ids"]}
        ordered = [i for i in dict.fromkeys(all_ids) if i in failing]
        checks.append({
            "name": name,
            "expectation": ", ".join(dict.fromkeys(d["expectation"] for d in mine)),
            "success": all(d["success"] for d in mine),
            "failing_count": len(ordered),
            "failing_dream_ids": ordered,
            "errors": [d["error"] for d in mine if d["error"]],
            "expectations": [{k: v for k, v in d.items() if k != "check"} for d in mine],
        })

    failing_sets = {c["name"]: set(c["failing_dream_ids"]) for c in checks}
    texts = df["text"] if "text" in df.columns else pd.Series([None] * len(df))
    rewards = _numeric(df["reward"]) if "reward" in df.columns else np.full(len(df), np.nan)
    dreams = [
        {
            "dream_id": i,
            "text": json_value(t),
            "reward": json_value(float(rw)),
            "failed_checks": [name for name in CHECKS if i in failing_sets[name]],
        }
        for i, t, rw in zip(all_ids, texts, rewards, strict=True)
    ]
    return DreamValidation(
        success=all(c["success"] for c in checks),
        checks=checks,
        dreams=dreams,
        gate=gate.model_dump(),
        id_column=id_column,
    )


def _numeric(values: pd.Series) -> np.ndarray:
    """Values as float64, non-numbers as NaN."""
    return pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)


def gate_dreams(df: pd.DataFrame, validation: DreamValidation) -> pd.DataFrame:
    """Add ``gate_passed``, ``failed_checks`` (";"-joined, "" if none) and ``promoted`` to a copy of ``df``.

    ``df`` must be the table ``validation`` was computed on (same ids); a dream is
    promoted when it passed every check and its reward is exactly 1.0.
    """
    by_id = validation.failed_checks_by_id()
    keys = df[validation.id_column] if validation.id_column else df.index.to_series()
    failed: list[list[str]] = []
    for k in keys:
        key = json_value(k)
        if key not in by_id:
            raise ValueError(f"dream {key!r} is not in this validation: gate the table it was validated on")
        failed.append(by_id[key])
    if len(df) != len(validation.dreams):
        raise ValueError(f"validation covers {len(validation.dreams)} dreams, the table has {len(df)}")
    out = df.copy()
    passed = np.asarray([not f for f in failed], dtype=bool)
    rewards = _numeric(df["reward"]) if "reward" in df.columns else np.full(len(df), np.nan)
    out["gate_passed"] = passed
    out["failed_checks"] = pd.Series([";".join(f) for f in failed], index=df.index, dtype="str")
    out["promoted"] = passed & (rewards == 1.0)
    return out


def gate_dream_table(df: pd.DataFrame, gate: DreamGateConfig, report_dir: Path) -> pd.DataFrame:
    """Score, validate and gate the dream table; write ``gate.json`` and ``gate.md``; return the gated table.

    Rejected dreams stay in the returned table with ``failed_checks`` naming why.
    """
    scored = add_check_columns(df, gate)
    validation = validate_dreams(scored, gate)
    gated = gate_dreams(scored, validation)
    report_dir = Path(report_dir)
    write_json(report_dir / GATE_JSON, validation.to_json())
    write_text(report_dir / GATE_MD, validation.to_markdown())
    return gated


__all__ = [
    "CHECKS",
    "DreamGateError",
    "DreamValidation",
    "gate_dream_table",
    "gate_dreams",
    "validate_dreams",
]
