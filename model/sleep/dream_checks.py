"""Derived columns the dream gate checks (docs/design.md §3 step 5), computed with rapidfuzz.

Pure pandas: the Great Expectations suite that reads these columns lives in
``checks/dreams.py``. Scores are rapidfuzz similarities in [0, 100]:

``dup_score``
    For each dream, the highest ``rapidfuzz.fuzz.ratio`` (normalised Indel
    similarity of the whole strings) against every *earlier* dream, by row order,
    with the same ``context_id`` in the same ``period`` (across rounds); 0 for the
    first dream of its (period, context_id). The first of two identical dreams
    scores 0, the second 100, so only the repeat is flagged.
``copy_score``
    ``rapidfuzz.fuzz.partial_ratio(text, context)``: the best ratio of the shorter
    string against any equally long window of the longer one. 100 means the dream
    is a verbatim piece of its context (or contains the whole context).
``text_len``
    ``len(text.strip())`` in characters.

Both scores are computed on the stripped text (surrounding whitespace says
nothing about a dream, and a whitespace-only dream would otherwise match the
context's spaces). A missing or non-string text counts as "" (scores 0,
``text_len`` 0); the gate's schema and ``text_not_empty`` checks reject it. When a
column a score needs is absent, that score is NaN, which the gate also rejects.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from rapidfuzz import fuzz

from model.config import DreamGateConfig

DREAM_COLUMNS: tuple[str, ...] = (
    "dream_id",
    "period",
    "round",
    "context_id",
    "context",
    "prompt",
    "text",
    "n_tokens",
    "importance",
    "selected",
    "selection",
    "tau_before",
    "tau_after",
    "reward",
    "trial_error",
)
"""The dream table as written by the dreaming stage, in order."""

DREAM_DTYPES: dict[str, str] = {
    "dream_id": "str",
    "period": "int64",
    "round": "int64",
    "context_id": "str",
    "context": "str",
    "prompt": "str",
    "text": "str",
    "n_tokens": "int64",
    "importance": "float64",
    "selected": "bool",
    "selection": "str",
    "tau_before": "float64",  # NaN if the dream was not tried
    "tau_after": "float64",
    "reward": "float64",  # 1.0, 0.0, or NaN when not tried
    "trial_error": "str",  # None where the trial ran; an all-None column is object dtype
}
SELECTIONS: tuple[str, ...] = ("topk", "random", "none", "all")
"""Values of ``selection``; "all" marks the no-selection ablation (every dream tried)."""

CHECK_COLUMNS: tuple[str, ...] = ("dup_score", "copy_score", "text_len")
"""Columns added by :func:`add_check_columns`, in order."""

CHECK_DTYPES: dict[str, str] = {"dup_score": "float64", "copy_score": "float64", "text_len": "int64"}


def _clean(text: Any) -> str:
    """The stripped text; "" for a missing or non-string value."""
    return text.strip() if isinstance(text, str) else ""


def dup_scores(texts: list[str], groups: list[Any]) -> list[float]:
    """Per position, max ``fuzz.ratio`` against earlier texts of the same group (0 for the first)."""
    seen: dict[Any, list[str]] = {}
    out: list[float] = []
    for text, group in zip(texts, groups, strict=True):
        earlier = seen.setdefault(group, [])
        out.append(max((float(fuzz.ratio(text, prev)) for prev in earlier), default=0.0))
        earlier.append(text)
    return out


def copy_score(text: str, context: str) -> float:
    """``fuzz.partial_ratio`` of the (stripped) dream against its context."""
    return float(fuzz.partial_ratio(_clean(text), context if isinstance(context, str) else ""))


def _group_key(value: Any) -> Any:
    """A hashable group key where NaN/None compare equal to each other."""
    return None if value is None or (isinstance(value, float) and value != value) else value


def add_check_columns(df: pd.DataFrame, gate: DreamGateConfig | None = None) -> pd.DataFrame:
    """Return a copy of ``df`` with ``dup_score``, ``copy_score`` and ``text_len`` (re)computed.

    ``gate`` is accepted for symmetry with the gate (thresholds are applied there,
    not here); the scores themselves do not depend on it. Row order matters for
    ``dup_score``: pass the table in the order the dreams were generated.
    """
    del gate
    out = df.drop(columns=[c for c in CHECK_COLUMNS if c in df.columns])
    n = len(out)
    texts = [_clean(t) for t in out["text"]] if "text" in out.columns else None
    if texts is not None and {"period", "context_id"} <= set(out.columns):
        groups = [(_group_key(p), _group_key(c)) for p, c in zip(out["period"], out["context_id"], strict=True)]
        dup = np.asarray(dup_scores(texts, groups), dtype=np.float64)
    else:
        dup = np.full(n, np.nan)
    if texts is not None and "context" in out.columns:
        copy = np.asarray([copy_score(t, c) for t, c in zip(texts, out["context"], strict=True)], dtype=np.float64)
    else:
        copy = np.full(n, np.nan)
    out["dup_score"] = dup
    out["copy_score"] = copy
    if texts is not None:
        out["text_len"] = np.asarray([len(t) for t in texts], dtype=np.int64)
    else:
        out["text_len"] = np.full(n, np.nan)
    return out
