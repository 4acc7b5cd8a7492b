"""What the reports share: a 95% CI as ``{mean, low, high}``, its text and its error bars; numbers that
may be missing; dataset and model text made inert in Markdown."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from model.evaluation.continual import mean_ci, paired_difference_ci


def ci_summary(values: Sequence[float]) -> dict[str, float | None]:
    """{mean, low, high}: the mean and its 95% Student-t CI (bounds None for a single value)."""
    m, lo, hi = mean_ci(values)
    return {"mean": m, "low": None if math.isnan(lo) else lo, "high": None if math.isnan(hi) else hi}


def paired_ci(a: Sequence[float], b: Sequence[float]) -> dict[str, float | None]:
    """a - b paired: {mean, low, high} with a 95% CI (low/high None where it is undefined, e.g. one pair)."""
    d, lo, hi = paired_difference_ci(a, b)
    return {"mean": d, "low": None if math.isnan(lo) else lo, "high": None if math.isnan(hi) else hi}


def paired_by_seed(a: dict[int, float], b: dict[int, float]) -> dict[str, Any] | None:
    """``a`` - ``b`` over the seeds both ran ({seed: value} each): {mean, low, high, seeds, above_zero, below_zero}
    (the 95% CI; None where no seed is common)."""
    common = sorted(set(a) & set(b))
    if not common:
        return None
    c = paired_ci([a[s] for s in common], [b[s] for s in common])
    return {**c, "seeds": common, "above_zero": c["low"] is not None and c["low"] > 0,
            "below_zero": c["high"] is not None and c["high"] < 0}


def error_bars(cs: Sequence[dict[str, float | None]]) -> list[list[float]]:
    """Matplotlib's asymmetric error bars from {mean, low, high} (0 where the CI is undefined)."""
    return [[0 if c["low"] is None else c["mean"] - c["low"] for c in cs],
            [0 if c["high"] is None else c["high"] - c["mean"] for c in cs]]


def format_ci(c: dict[str, float | None], digits: int = 3) -> str:
    """``mean [low, high]`` (just the mean when the CI is undefined; n/a when the metric is)."""
    if c["mean"] is None:
        return "n/a"
    if c["low"] is None:
        return f"{c['mean']:.{digits}f}"
    return f"{c['mean']:.{digits}f} [{c['low']:.{digits}f}, {c['high']:.{digits}f}]"


def fmt(x: float | None, digits: int = 2) -> str:
    """``x`` with ``digits`` decimals; "n/a" when it is missing (undefined)."""
    return "n/a" if x is None else f"{x:.{digits}f}"


# Dataset and dream text in a Markdown report must stay text in any renderer (some pass raw HTML through):
# no tag (`<`, `>`, `&` as entities), no link syntax (`[`, `]`, and the backslash, so an escape cannot be undone),
# no cell or line break.
_MD_ESCAPES = str.maketrans({"\\": "\\\\", "|": "\\|", "[": "\\[", "]": "\\]", "&": "&amp;", "<": "&lt;", ">": "&gt;",
                             "\n": " ", "\r": " "})


def escape_md(text: str) -> str:
    """Text for one line (or table cell) of a Markdown report: inert in any renderer (see _MD_ESCAPES)."""
    return text.translate(_MD_ESCAPES)
