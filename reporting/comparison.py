"""The report of a comparison: ``reports/<name>/`` (docs/design.md §5).

- ``README.md``: one row per method: final average accuracy, the earlier tasks' final accuracy,
  forgetting and backward transfer as mean [95% CI] over seeds, gradient steps, minutes; then the target
  check (sleep vs the methods that keep no raw past data, and vs sequential
  fine-tuning by the CI of the per-seed differences), then every run's matrix.
- ``metrics.json`` (DVC metrics): per method, the means and CIs.
- ``runs.csv`` (a row per run), ``accuracy.csv`` (a row per run, after-task and task):
  DVC plots.
- ``plots/``: accuracy matrix per method (mean over seeds), final accuracy and
  forgetting per method with error bars, accuracy of each task over time.

Definitions (``model/evaluation/continual.py``): R[i][j] is the accuracy on task j after task i;
final average accuracy = mean_j R[T-1][j]; earlier tasks' final accuracy = mean over j < T-1 of
R[T-1][j] (none with one task); forgetting = mean over j < T-1 of
max_{j <= i <= T-2} R[i][j] - R[T-1][j] (Chaudhry et al. 2018); backward transfer =
mean over j < T-1 of R[T-1][j] - R[j][j] (Lopez-Paz & Ranzato 2017).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from model.config import METHODS, STORES_RAW_DATA, Params
from model.evaluation.continual import (DIAGNOSTIC_STATES, accuracy_matrix, backward_transfer, earlier_tasks_accuracy,
                                        final_average_accuracy, forgetting)
from model.io import atomic_dir, write_json, write_text
from reporting.common import ci_summary, format_ci, paired_by_seed
from reporting.figures import COLORS, figure_style, save_png

METRICS = ("final_accuracy", "earlier_accuracy", "forgetting", "backward_transfer")


def run_metrics(result: dict, n_tasks: int) -> dict[str, Any]:
    """A run's accuracy matrix and its continual-learning metrics (``earlier_accuracy`` None with one task)."""
    R = accuracy_matrix(result["accuracy"], n_tasks)
    return {"matrix": R, "final_accuracy": final_average_accuracy(R), "earlier_accuracy": earlier_tasks_accuracy(R),
            "forgetting": forgetting(R), "backward_transfer": backward_transfer(R)}


def summarise(results: Sequence[dict], methods: Sequence[str], seeds: Sequence[int]) -> dict[str, Any]:
    """Per method: each metric's mean and 95% CI over seeds, mean matrix, steps, seconds."""
    n_tasks = max(len(r["accuracy"]) for r in results)
    by = {(r["method"], r["seed"]): {**r, **run_metrics(r, n_tasks)} for r in results}
    out: dict[str, Any] = {}
    for m in methods:
        runs = [by[(m, s)] for s in seeds if (m, s) in by]
        if not runs:
            continue
        mats = np.array([[[math.nan if v is None else v for v in row] for row in r["matrix"]] for r in runs])
        out[m] = {
            **{k: _ci_or_none([r[k] for r in runs]) for k in METRICS},
            "per_seed": {k: [r[k] for r in runs] for k in METRICS},
            "seeds": [r["seed"] for r in runs],
            "mean_matrix": [[None if math.isnan(v) else float(v) for v in row] for row in np.nanmean(mats, axis=0)]
            if len(runs) else None,
            "gradient_steps": float(np.mean([r["gradient_steps"] for r in runs])),
            "seconds": float(np.sum([r["seconds"] for r in runs])),
            "stores_raw_data": m in STORES_RAW_DATA,
        }
    return out


def _ci_or_none(values: Sequence[float | None]) -> dict[str, float | None]:
    """ci_summary of the values; all None where any is (a metric a one-task stream does not define)."""
    if any(v is None for v in values):
        return {"mean": None, "low": None, "high": None}
    return ci_summary(values)


#: Methods that learn nothing (excluded from "forgets least": forgetting nothing is no achievement).
NON_LEARNERS = frozenset({"zero_shot", "icl"})


def target_check(summary: dict[str, Any], reference: str = "sleep",
                 against: Sequence[str] = ("ewc", "finetune", "cms"),
                 near: Sequence[tuple[str, float]] = (("replay", 0.05), ("joint", 0.15))) -> dict[str, Any]:
    """Issue #13's targets, checked: is ``reference``'s final accuracy above each method of ``against``
    with the paired 95% CI (over seeds) above zero; does it forget least of the methods that learn and keep
    no raw past data; and is it within the given margin of each ``near`` method (replay, joint)?"""
    if reference not in summary:
        return {"checked": False, "why": f"no {reference} runs in this comparison"}
    pool = [m for m in summary if not summary[m]["stores_raw_data"]]
    learners = [m for m in pool if m not in NON_LEARNERS]
    best_acc = max(pool, key=lambda m: summary[m]["final_accuracy"]["mean"])
    least_forget = min(learners, key=lambda m: summary[m]["forgetting"]["mean"])
    out: dict[str, Any] = {"checked": True, "pool": pool, "learners": learners, "best_final_accuracy": best_acc,
                           "lowest_forgetting": least_forget,
                           "highest_accuracy": best_acc == reference, "lowest_forgetting_ok": least_forget == reference,
                           "margins": {}, "gaps": {}}
    ok = out["lowest_forgetting_ok"]
    if not ok:  # how far from the least-forgetting method, paired over seeds (the target itself stays "no"), and
        # whether the earlier tasks end higher or lower than that method's (a method that never learned a task well
        # cannot lose much of it)
        out["forgetting_gap"] = _paired_gap(summary, reference, least_forget, "forgetting")
        out["earlier_gap"] = _paired_gap(summary, reference, least_forget, "earlier_accuracy")
    for other in against:
        if other not in summary:
            continue
        c = _paired_gap(summary, reference, other, "final_accuracy")  # paired over the seeds both ran
        if c is None:
            continue
        out["margins"][other] = c
        ok = ok and c["above_zero"]
    for other, margin in near:
        if other not in summary:
            continue
        gap = summary[other]["final_accuracy"]["mean"] - summary[reference]["final_accuracy"]["mean"]
        out["gaps"][other] = {"gap": gap, "allowed": margin, "within": bool(gap <= margin)}
        ok = ok and gap <= margin
    out["met"] = bool(ok and out["margins"])
    return out


def _paired_gap(summary: dict[str, Any], a: str, b: str, metric: str) -> dict[str, Any] | None:
    """``a`` - ``b`` in ``metric``, paired over the seeds both ran: mean, 95% CI, seeds, above/below zero (None: no
    common seed, or a metric the runs do not define)."""
    if any(v is None for m in (a, b) for v in summary[m]["per_seed"][metric]):
        return None
    c = paired_by_seed(dict(zip(summary[a]["seeds"], summary[a]["per_seed"][metric])),
                       dict(zip(summary[b]["seeds"], summary[b]["per_seed"][metric])))
    return None if c is None else {"other": b, **c}


def markdown(name: str, description: str, summary: dict[str, Any], target: dict[str, Any], seeds: Sequence[int],
             results: Sequence[dict], params: Params) -> str:
    """The report's README.md."""
    lines = [f"# Comparison `{name}`", ""]
    if description:
        lines += [description, ""]
    src = params.data.source
    lines += [
        # the data the runs read, whatever the description says (a params file may change only data.source)
        f"Data: `{src.path}` ({src.format}; text `{src.text_field}`, label `{src.label_field}`"
        + (f"; excluded labels {list(src.exclude_labels)}" if src.exclude_labels else "") + ").",
        "",
        f"Seeds {list(seeds)} (each seed draws its own tasks); {params.data.n_tasks} tasks x "
        f"{params.data.labels_per_task} labels, {params.data.train_per_label} train / {params.data.test_per_label} "
        f"test examples per label, model `{params.model.source}`. Mean over seeds with a 95% Student-t CI.",
        "",
        "| method | keeps raw past data | final avg accuracy | earlier tasks' final accuracy | forgetting | "
        "backward transfer | gradient steps | minutes (all seeds) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for m, s in summary.items():
        lines.append(f"| {m} | {'yes' if s['stores_raw_data'] else 'no'} | {format_ci(s['final_accuracy'])} | "
                     f"{format_ci(s['earlier_accuracy'])} | {format_ci(s['forgetting'])} | "
                     f"{format_ci(s['backward_transfer'])} | {s['gradient_steps']:.0f} | {s['seconds'] / 60:.1f} |")
    lines += ["", "Methods: " + "; ".join(f"**{m}**: {METHODS[m]}" for m in summary), ""]
    machines = machines_table(results)
    if machines["machine"].nunique() > 1:
        lines += [f"**These runs come from {machines['machine'].nunique()} machines** (see Machines below). The "
                  "same code, stream and seed give different floating point on different machines, and a "
                  "run's final accuracy can move by several points with it: a paired difference is a clean "
                  "comparison only on the seeds whose runs share a machine.", ""]
    lines += ["## Target", ""]
    if not target.get("checked"):
        lines.append(f"Not checked: {target.get('why')}.")
    else:
        yes = lambda ok: "yes" if ok else "**no**"  # noqa: E731
        lines += [
            f"Among the methods that keep no raw past data ({', '.join(target['pool'])}):",
            f"- highest final accuracy: {target['best_final_accuracy']} (sleep: {yes(target['highest_accuracy'])})",
            f"- lowest forgetting among those that learn ({', '.join(target['learners'])}): "
            f"{target['lowest_forgetting']} (sleep: {yes(target['lowest_forgetting_ok'])})",
        ]
        gap = target.get("forgetting_gap")
        if gap is not None:
            apart = gap["low"] is not None and (gap["low"] > 0 or gap["high"] < 0)
            lines.append(f"- sleep - {gap['other']}, forgetting, paired over seeds {gap['seeds']}: {format_ci(gap)} ("
                         + ("the interval excludes zero" if apart else "the interval holds zero: the two are not "
                            "told apart on these seeds") + ")")
        earlier = target.get("earlier_gap")
        if earlier is not None:
            lines.append(f"- sleep - {earlier['other']}, the earlier tasks' final accuracy (every task but the last, "
                         f"at the end), paired over seeds {earlier['seeds']}: {format_ci(earlier)}")
        for other, m in target["margins"].items():
            lines.append(f"- sleep - {other}, final accuracy, paired over seeds {m['seeds']}: {format_ci(m)} "
                         f"(interval above zero: {yes(m['above_zero'])})")
        for other, g in target["gaps"].items():
            lines.append(f"- {other} - sleep, final accuracy: {g['gap']:+.3f} (within {g['allowed']:.2f}: "
                         f"{yes(g['within'])})")
        lines.append(f"- target met: {yes(target['met'])}")
    diag = diagnostics_table(results)
    if not diag.empty:
        lines += ["", "## Where forgetting happens", "",
                  "Mean over seeds of the accuracy of the earlier tasks (mean over them) and of the cycle's own task, "
                  "among all labels seen so far, in each state of each cycle "
                  "(`lifecycle.diagnostics`; the methods that measured it).", "",
                  "| method | cycle | state | earlier tasks | this cycle's task |", "| --- | --- | --- | --- | --- |"]
        for (m, period, state), g in diag.groupby(["method", "period", "state"], sort=False):
            old = g["earlier"].dropna()
            lines.append(f"| {m} | {period} | {state.replace('_', ' ')} | "
                         f"{f'{old.mean():.3f}' if len(old) else '–'} | {g['current'].mean():.3f} |")
        lines += ["", "![where forgetting happens](plots/diagnostics.png)"]
    routed = routing_table(results)
    if not routed.empty:
        lines += ["", "## Routing", "",
                  "Share of each seen task's test inputs that prototype routing sent to the task's own period, "
                  "after the last sleep (mean over seeds and tasks; an input sent to an earlier period meets "
                  "experts that never learned its task).", "", "| method | seeds | routed to their own period |",
                  "| --- | --- | --- |"]
        for m, g in routed.groupby("method", sort=False):
            lines.append(f"| {m} | {g['seed'].nunique()} | {format_ci(ci_summary(g.groupby('seed')['share'].mean().tolist()))} |")
    lines += ["", "## Machines", "", "Where the runs computed (`machine` in each run's result.json; "
              "`unknown`: a result written before runs recorded it).", "",
              "| machine | processor | torch (CPU kernels) | threads | device | runs |", "| --- | --- | --- | --- | --- | --- |"]
    for mid, g in machines.groupby("machine", sort=False):
        first = g.iloc[0]
        lines.append(f"| {mid} | {first['processor']} | {first['torch']} ({first['cpu_kernels']}) | {first['threads']} | "
                     f"{first['device']} | " + ", ".join(f"{m} {s}" for m, s in zip(g["method"], g["seed"])) + " |")
    lines += ["", "## Plots", "", "![accuracy matrices](plots/accuracy_matrices.png)", "",
              "![final accuracy and forgetting](plots/final_forgetting.png)", "",
              "![accuracy of each task over time](plots/task_accuracy.png)", "", "## Runs", ""]
    for r in results:
        rows = "; ".join(" ".join(f"{a:.2f}" for a in row.values()) for row in r["accuracy"])
        funnels = r.get("dream_funnels")
        extra = ""
        if funnels and any(funnels):
            extra = " · dreams promoted per sleep " + "/".join(str((f or {}).get("promoted", 0)) for f in funnels)
            if any("kept" in (f or {}) for f in funnels):  # dream.promotion_check: was the stage's training kept?
                extra += " (training kept: " + "/".join(
                    {True: "yes", False: "no"}.get((f or {}).get("kept"), "-") for f in funnels) + ")"
        lines.append(f"- {r['method']}, seed {r['seed']}: R rows {rows} · {r['gradient_steps']} steps · "
                     f"{r['seconds']:.0f} s{extra}")
    return "\n".join(lines) + "\n"


def machines_table(results: Sequence[dict]) -> pd.DataFrame:
    """One row per run: its method, seed and the machine it computed on (``unknown`` where it has no record)."""
    rows = []
    for r in results:
        m = r.get("machine") or {}
        rows.append({"method": r["method"], "seed": r["seed"], "machine": m.get("id", "unknown"),
                     **{k: m.get(k, "?") for k in ("processor", "cpu_kernels", "torch", "threads", "device")}})
    return pd.DataFrame(rows, columns=["method", "seed", "machine", "processor", "cpu_kernels", "torch", "threads",
                                       "device"])


def routing_table(results: Sequence[dict]) -> pd.DataFrame:
    """One row per (method, seed, task) of the runs with prototype routing: the share of the task's test
    inputs routed to its own period after the last sleep."""
    rows = []
    for r in results:
        last = (r.get("routing_accuracy") or [None])[-1]
        for t, share in (last or {}).items():
            rows.append({"method": r["method"], "seed": r["seed"], "task": int(t), "share": share})
    return pd.DataFrame(rows, columns=["method", "seed", "task", "share"])


def diagnostics_table(results: Sequence[dict]) -> pd.DataFrame:
    """One row per (method, seed, cycle, state) of the runs that measured diagnostics: the mean accuracy
    of the earlier tasks (NaN in cycle 0) and the accuracy of the cycle's own task."""
    rows = []
    for r in results:
        for period, diag in enumerate(r.get("diagnostics") or []):
            for state, _ in DIAGNOSTIC_STATES:
                accs = (diag or {}).get(state)
                if not accs:
                    continue
                old = [a for t, a in accs.items() if int(t) < period]
                rows.append({"method": r["method"], "seed": r["seed"], "period": period, "state": state,
                             "earlier": sum(old) / len(old) if old else math.nan,
                             "current": accs.get(str(period), math.nan)})
    return pd.DataFrame(rows, columns=["method", "seed", "period", "state", "earlier", "current"])


def plot_diagnostics(diag: pd.DataFrame) -> Figure:
    """Mean accuracy of the earlier tasks and of the cycle's task in each state, per method (mean over seeds)."""
    with figure_style():
        fig = Figure(figsize=(7.2, 4.2), dpi=130)
        ax = fig.add_subplot()
        if diag.empty:
            ax.text(0.5, 0.5, "no diagnostics", ha="center", va="center", transform=ax.transAxes)
            return fig
        states = [n for n, _ in DIAGNOSTIC_STATES]
        for k, (m, g) in enumerate(diag.groupby("method", sort=False)):
            mean = g.groupby(["period", "state"]).mean(numeric_only=True).reset_index()
            mean["order"] = mean["period"] * len(states) + mean["state"].map(states.index)
            mean = mean.sort_values("order")
            ax.plot(mean["order"], mean["earlier"], marker="o", color=COLORS[(2 * k) % len(COLORS)],
                    label=f"{m}: earlier tasks")
            ax.plot(mean["order"], mean["current"], marker="s", linestyle="--", color=COLORS[(2 * k + 1) % len(COLORS)],
                    label=f"{m}: this cycle's task")
        periods = sorted(diag["period"].unique())
        ticks = [p * len(states) + i for p in periods for i in range(len(states))]
        ax.set_xticks(ticks, [f"{p}: {s.replace('after_', '').replace('_', ' ')}" for p in periods for s in states],
                      rotation=60, ha="right", fontsize=6)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("accuracy among all seen labels")
        ax.set_title("Where forgetting happens (mean over seeds)")
        ax.legend(fontsize=7, loc="lower left")
        fig.subplots_adjust(bottom=0.34)  # room for the rotated state names
    return fig


def plot_matrices(summary: dict[str, Any]) -> Figure:
    """One heatmap per method: the accuracy matrix averaged over seeds."""
    methods = list(summary)
    cols = min(4, len(methods))
    rows = -(-len(methods) // cols)
    with figure_style():
        fig = Figure(figsize=(3.0 * cols, 2.7 * rows), layout="constrained")
        axes = fig.subplots(rows, cols, squeeze=False)
        for k, ax in enumerate(axes.flat):
            if k >= len(methods):
                ax.set_visible(False)
                continue
            m = methods[k]
            R = summary[m]["mean_matrix"]
            t = len(R)
            vals = [[math.nan if (j > i or R[i][j] is None) else R[i][j] for j in range(t)] for i in range(t)]
            im = ax.imshow(vals, cmap="viridis", vmin=0, vmax=1, aspect="auto")
            for i in range(t):
                for j in range(t):
                    if not math.isnan(vals[i][j]):
                        ax.text(j, i, f"{vals[i][j]:.2f}", ha="center", va="center", fontsize=7,
                                color="white" if vals[i][j] < 0.6 else "black")
            ax.set_xticks(range(t))
            ax.set_yticks(range(t))
            ax.set_title(m, fontsize=9)
            ax.set_xlabel("task j", fontsize=8)
            ax.set_ylabel("after task i", fontsize=8)
        fig.colorbar(im, ax=axes, shrink=0.6, label="accuracy")
        fig.suptitle("Accuracy matrix R[i][j] per method (mean over seeds)")
    return fig


def plot_final_forgetting(summary: dict[str, Any]) -> Figure:
    """Bars with 95% CI error bars: final average accuracy and forgetting per method."""
    methods = list(summary)
    with figure_style():
        fig = Figure(figsize=(max(6.0, 0.8 * len(methods) + 2), 3.6), layout="constrained")
        axes = fig.subplots(1, 2)
        for ax, key, title in zip(axes, ("final_accuracy", "forgetting"), ("final average accuracy", "forgetting")):
            means = [summary[m][key]["mean"] for m in methods]
            err = [[0 if summary[m][key]["low"] is None else summary[m][key]["mean"] - summary[m][key]["low"]
                    for m in methods],
                   [0 if summary[m][key]["high"] is None else summary[m][key]["high"] - summary[m][key]["mean"]
                    for m in methods]]
            colors = [COLORS[3] if m == "sleep" else (COLORS[7] if summary[m]["stores_raw_data"] else COLORS[0])
                      for m in methods]
            ax.bar(range(len(methods)), means, yerr=err, capsize=3, color=colors)
            ax.set_xticks(range(len(methods)), methods, rotation=45, ha="right")
            ax.set_title(f"{title} (95% CI)")
            ax.axhline(0, color="#444444", linewidth=0.6)
        fig.suptitle("grey: keeps raw past data · red: sleep")
    return fig


def plot_task_accuracy(summary: dict[str, Any]) -> Figure:
    """Accuracy of each task after each later task, one panel per task, a line per method."""
    methods = list(summary)
    t = len(next(iter(summary.values()))["mean_matrix"])
    with figure_style():
        fig = Figure(figsize=(3.2 * t, 3.0), layout="constrained")
        axes = fig.subplots(1, t, squeeze=False)[0]
        for j, ax in enumerate(axes):
            for k, m in enumerate(methods):
                R = summary[m]["mean_matrix"]
                xs = list(range(j, t))
                ax.plot(xs, [R[i][j] for i in xs], marker="o", markersize=3, label=m,
                        color=COLORS[k % len(COLORS)], linestyle="-" if k < len(COLORS) else "--")
            ax.set_title(f"task {j}")
            ax.set_xlabel("after task i")
            ax.set_ylim(0, 1.02)
            ax.set_xticks(range(t))
        axes[0].set_ylabel("accuracy (mean over seeds)")
        axes[-1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5))
    return fig


def write_comparison_report(params: Params, root: Path, comp: Any, results: list[dict]) -> dict[str, Any]:
    """Write ``reports/<name>/`` as a whole, atomically; return the summary."""
    name = comp.name + ("-quick" if comp.quick else "")
    out = root / params.evaluation.reports_dir / name
    summary = summarise(results, comp.methods, comp.seeds)
    target = target_check(summary)
    run_params = params.for_run(comp.overrides, f"evaluation.comparisons.{comp.name}.overrides")
    n_tasks = max(len(r["accuracy"]) for r in results)
    runs = pd.DataFrame([{"method": r["method"], "seed": r["seed"],
                          **{k: run_metrics(r, n_tasks)[k] for k in METRICS},
                          "gradient_steps": r["gradient_steps"], "seconds": r["seconds"]} for r in results])
    acc = pd.DataFrame([{"method": r["method"], "seed": r["seed"], "after_task": i, "task": int(j), "accuracy": a}
                        for r in results for i, row in enumerate(r["accuracy"]) for j, a in row.items()])
    metrics = {m: {k: s[k] for k in METRICS} | {"gradient_steps": s["gradient_steps"]} for m, s in summary.items()}
    with atomic_dir(out) as tmp:
        write_text(tmp / "README.md", markdown(name, comp.description, summary, target, comp.seeds, results, run_params))
        write_json(tmp / "metrics.json", {"comparison": name, "seeds": list(comp.seeds), "methods": metrics,
                                          "target": target,
                                          "machines": sorted(machines_table(results)["machine"].unique().tolist())})
        write_json(tmp / "results.json", {"comparison": name, "summary": summary, "runs": results})
        write_text(tmp / "runs.csv", runs.to_csv(index=False))
        write_text(tmp / "accuracy.csv", acc.to_csv(index=False))
        save_png(plot_matrices(summary), tmp / "plots" / "accuracy_matrices.png")
        save_png(plot_final_forgetting(summary), tmp / "plots" / "final_forgetting.png")
        save_png(plot_task_accuracy(summary), tmp / "plots" / "task_accuracy.png")
        diag = diagnostics_table(results)
        write_text(tmp / "diagnostics.csv", diag.to_csv(index=False))
        save_png(plot_diagnostics(diag), tmp / "plots" / "diagnostics.png")
    return {"report": str(out / "README.md"), "summary": summary, "target": target}
