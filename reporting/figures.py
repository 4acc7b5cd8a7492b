"""The figures' common look: matplotlib's defaults plus the reports' settings, one palette, and PNGs
written without a software tag, so a rerun gives byte-identical files (matplotlib's object API on the
Agg canvas; no pyplot state)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import matplotlib.style
from matplotlib.figure import Figure

from model.io import atomic_path

FIGSIZE = (6.4, 4.2)  # inches; with DPI the PNGs are 832 x 546 pixels
DPI = 130

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


def save_png(fig: Figure, dest: str | Path) -> Path:
    """Write ``fig`` as a PNG atomically, without the software tag, so reruns give identical bytes."""
    with figure_style(), atomic_path(dest) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, metadata={"Software": None})
    return Path(dest)
