"""The lifecycle report's figures: accuracy matrix, accuracy of each task, dream funnel, diagnostics."""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from typing import Any

from matplotlib.figure import Figure

from model.evaluation.continual import DIAGNOSTIC_STATES
from reporting.common import fmt
from reporting.figures import COLORS, DPI, FIGSIZE, figure_style
from reporting.lifecycle.metrics import continual_learning_metrics, fsum_mean
from reporting.lifecycle.records import FUNNEL_STAGES, NONE, Cycle, DreamFunnel


def _figure() -> Figure:
    return Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")


def _empty(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=11, color="#666666")


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
            f"forgetting {fmt(cl.forgetting)} · backward transfer {fmt(cl.backward_transfer)}"
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
        ax.plot(xs, [fsum_mean(seen[i]) for i in xs], linestyle="--", color="black", marker="s", markersize=4,
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
