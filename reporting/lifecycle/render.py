"""The lifecycle report as Markdown (``report.md``) and as a table on the console."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from model.evaluation.continual import DIAGNOSTIC_STATES
from reporting.common import escape_md, fmt
from reporting.lifecycle.load import show_path
from reporting.lifecycle.metrics import continual_learning_metrics
from reporting.lifecycle.records import FIGURES, FUNNEL_STAGES, NONE, Cycle, LifecycleMetrics


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
    return "; ".join(f"{escape_md(x.src)}→{escape_md(x.dst)} (slot {x.slot}, retention {fmt(x.retention_loss)})"
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
        f"**{cl.final_average_accuracy:.3f}**, forgetting **{fmt(cl.forgetting, 3)}**, backward transfer "
        f"**{fmt(cl.backward_transfer, 3)}** (definitions below).",
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
        ["forgetting", fmt(cl.forgetting, 3),
         "mean over j < T-1 of (max over j ≤ i < T-1 of R[i][j]) - R[T-1][j]"],
        ["backward transfer", fmt(cl.backward_transfer, 3), "mean over j < T-1 of R[T-1][j] - R[j][j]"],
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
            rows.append([str(c.period), f"{escape_md(x.src)} → {escape_md(x.dst)}", str(x.slot)])
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
        lines += ["## Sources", "", *(f"- `{show_path(p, base)}`" for p in metrics.sources), ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def print_summary_table(summary: dict[str, Any], console: Console | None = None) -> None:
    """Print the summary (from :func:`write_lifecycle_report` or :func:`summarize`) as a table, one row per cycle."""
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
        cons = "; ".join(f"{x['src']}→{x['dst']} {fmt(x['retention_loss'])}" for x in c["consolidations"]) or NONE
        funnel = c["dream_funnel"]
        dreams = f"{funnel['promoted']} of {funnel['generated']}" if funnel else (
            f"{NONE} (off)" if c.get("dreaming") == "off" else NONE)
        table.add_row(str(c["cycle"]), *(f"{acc[str(j)]:.2f}" if str(j) in acc else "–" for j in range(n)),
                      fmt(c["mean_accuracy_seen"]), cons, dreams)
    cl = summary["continual_learning"]
    console.print(table)
    console.print(f"final average accuracy {cl['final_average_accuracy']:.3f} · forgetting "
                  f"{fmt(cl['forgetting'], 3)} · backward transfer {fmt(cl['backward_transfer'], 3)}")
    if "files" in summary:
        console.print(f"report: {summary['files']['report']}")
