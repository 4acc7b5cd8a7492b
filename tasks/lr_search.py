"""The learning-rate search that gives every method the same tuning budget (``lm-sleep lr-search``, issue #13).

Every method of ``evaluation.lr_search.methods`` runs with every value of its ``grid`` on
development streams: the budget and sizes of the comparison it names, drawn from labels
that no seed of any continual comparison puts in its stream (``evaluation_labels``), so
tuning never sees an evaluation task. Each grid value is a comparison of its own under
``<work_dir>/lr-search/lr-<value>/`` (resumable like any comparison). The choice per
method is the value with the best final average accuracy, mean over the development
seeds (ties: the smaller rate). ``reports/lr-search/`` holds the table, the choice, the
rates params.yaml sets now and a plot; a person copies the choice into params.yaml
(``cms.levels`` for sleep, ``evaluation.baselines.lr`` / ``evaluation.lrs`` for the rest).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from prefect import task
from prefect.cache_policies import NO_CACHE

from model.config import ConfigError, Params, cms_lr_overrides, merge_overrides
from model.evaluation.comparison import BASELINES
from model.evaluation.continual import accuracy_matrix, final_average_accuracy, forgetting
from model.io import atomic_dir, write_json, write_text
from reporting import COLORS, save_png
from tasks.compare import Comparison, development_overrides, resolve_comparison

NAME = "lr-search"


def search_params(params: Params) -> Params:
    """The project's params without ``evaluation.lrs``: during the search every run takes the grid's value."""
    return params.model_copy(update={"evaluation": params.evaluation.model_copy(update={"lrs": {}})})


def search_comparisons(params: Params, root: Path, quick: bool = False) -> tuple[int, list[tuple[float, Comparison]]]:
    """How many evaluation labels are excluded, and one development comparison per grid value: (rate, comparison).

    The named comparison's overrides (with ``evaluation.quick`` when ``quick``), plus every label of the
    evaluation streams excluded from the source and the CMS levels' rates set from the grid value.
    """
    cfg = params.evaluation.lr_search
    known = params.evaluation.comparisons
    if cfg.comparison not in known or known[cfg.comparison].kind != "continual":
        continual = [k for k, c in known.items() if c.kind == "continual"]
        raise ConfigError(f"params: evaluation.lr_search.comparison {cfg.comparison!r} is not a continual comparison "
                          f"of evaluation.comparisons (continual: {', '.join(continual) or 'none'})")
    base = resolve_comparison(params, cfg.comparison, quick)
    base_params = params.for_run(base.overrides, f"evaluation.comparisons.{cfg.comparison}.overrides")
    dev, n_excluded = development_overrides(params, root, base)
    seeds = base.seeds if quick else tuple(cfg.seeds)
    out = []
    for lr in cfg.grid:
        overrides = merge_overrides(dev, cms_lr_overrides(base_params.cms, lr))
        desc = (f"Learning-rate search, lr {lr:g}: {cfg.comparison}'s budget on development tasks "
                f"({n_excluded} evaluation labels excluded).")
        out.append((lr, Comparison(f"{NAME}/lr-{lr:g}", tuple(cfg.methods), seeds, overrides, quick, desc)))
    return n_excluded, out


def current_lrs(params: Params) -> dict[str, float]:
    """The learning rate each searchable method runs with in the comparisons now (what the search may change)."""
    ev = params.evaluation
    out = {}
    for m in ev.lr_search.methods:
        default = ev.baselines.lr if m in BASELINES else params.cms.levels[0].lr
        out[m] = ev.lrs.get(m, default)
    return out


def _final(result: dict) -> float:
    return final_average_accuracy(accuracy_matrix(result["accuracy"], len(result["accuracy"])))


def _forgetting(result: dict) -> float:
    return forgetting(accuracy_matrix(result["accuracy"], len(result["accuracy"])))


def search_table(grid_results: dict[float, list[dict]]) -> list[dict[str, Any]]:
    """One row per (method, learning rate): final accuracy and forgetting, mean over the dev seeds, and seconds."""
    rows = []
    for lr, results in sorted(grid_results.items()):
        by_method: dict[str, list[dict]] = {}
        for r in results:
            by_method.setdefault(r["method"], []).append(r)
        for method, runs in by_method.items():
            rows.append({"method": method, "lr": lr, "seeds": sorted(r["seed"] for r in runs),
                         "final_accuracy": statistics.fmean(_final(r) for r in runs),
                         "forgetting": statistics.fmean(_forgetting(r) for r in runs),
                         "seconds": statistics.fmean(r["seconds"] for r in runs)})
    return rows


def choose(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Per method, the learning rate with the best mean final accuracy (ties: the smaller rate)."""
    best: dict[str, dict[str, Any]] = {}
    for row in sorted(rows, key=lambda r: r["lr"]):
        if row["method"] not in best or row["final_accuracy"] > best[row["method"]]["final_accuracy"] + 1e-12:
            best[row["method"]] = row
    return {m: r["lr"] for m, r in best.items()}


def markdown(params: Params, rows: list[dict[str, Any]], chosen: dict[str, float], now: dict[str, float],
             seeds: tuple[int, ...], n_excluded: int) -> str:
    cfg = params.evaluation.lr_search
    grid = sorted({r["lr"] for r in rows})
    cell = {(r["method"], r["lr"]): r for r in rows}
    lines = [
        "# Learning-rate search", "",
        f"Every method with each of {len(grid)} learning rates on development streams: comparison "
        f"`{cfg.comparison}`'s budget and sizes, tasks drawn from labels that no evaluation stream uses "
        f"({n_excluded} labels excluded), seeds {list(seeds)}. A LoRA baseline's rate is its AdamW rate; a CMS "
        "method's is the fast level's wake rate (slower levels keep their ratio). Chosen: the best final average "
        "accuracy (ties: the smaller rate). Cells: final accuracy / forgetting.", "",
        "| method | " + " | ".join(f"lr {lr:g}" for lr in grid) + " | chosen | params.yaml now |",
        "| --- | " + " | ".join("---" for _ in grid) + " | --- | --- |",
    ]
    for m in cfg.methods:
        if m not in chosen:
            continue
        cells = []
        for lr in grid:
            r = cell.get((m, lr))
            text = "-" if r is None else f"{r['final_accuracy']:.3f} / {r['forgetting']:.3f}"
            cells.append(f"**{text}**" if lr == chosen[m] else text)
        flag = "" if abs(chosen[m] - now[m]) <= 1e-12 * max(1.0, now[m]) else " (differs)"
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {chosen[m]:g} | {now[m]:g}{flag} |")
    lines += ["", "Minutes per run (mean over seeds):", "",
              "| method | " + " | ".join(f"lr {lr:g}" for lr in grid) + " |",
              "| --- | " + " | ".join("---" for _ in grid) + " |"]
    for m in cfg.methods:
        if m in chosen:
            lines.append(f"| {m} | " + " | ".join("-" if (m, lr) not in cell else f"{cell[(m, lr)]['seconds'] / 60:.1f}"
                                                  for lr in grid) + " |")
    lines += ["", "Where the choice goes: `cms.levels[*].lr` for sleep (the product's default, slower levels at "
              "their ratio), `evaluation.baselines.lr` for the LoRA baselines, and `evaluation.lrs.<method>` for a "
              "method whose choice differs from those.", ""]
    return "\n".join(lines)


def plot_search(rows: list[dict[str, Any]], chosen: dict[str, float]) -> Figure:
    fig = Figure(figsize=(7.0, 4.2), dpi=120, layout="constrained")
    ax = fig.add_subplot()
    for i, m in enumerate(dict.fromkeys(r["method"] for r in rows)):
        pts = sorted((r["lr"], r["final_accuracy"]) for r in rows if r["method"] == m)
        color = COLORS[i % len(COLORS)]
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", color=color, label=m)
        best = [y for x, y in pts if x == chosen.get(m)]
        if best:
            ax.plot([chosen[m]], best, marker="*", markersize=14, color=color, linestyle="none")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (LoRA: AdamW; CMS: fast level)")
    ax.set_ylabel("final average accuracy (dev)")
    ax.set_ylim(0, 1)
    ax.set_title("Learning-rate search on development tasks (star: chosen)")
    ax.legend(fontsize=8, ncol=2)
    return fig


@task(cache_policy=NO_CACHE)
def write_lr_search_report(params: Params, root: Path, grid_results: dict[float, list[dict]],
                           seeds: tuple[int, ...], quick: bool, n_excluded: int) -> dict[str, Any]:
    """Write ``reports/lr-search/`` (README.md table, results.json, plots/lr_search.png) atomically; return
    {report, chosen, now, rows}."""
    rows = search_table(grid_results)
    chosen = choose(rows)
    now = current_lrs(params)
    out = root / params.evaluation.reports_dir / (NAME + ("-quick" if quick else ""))
    with atomic_dir(out) as tmp:
        write_text(tmp / "README.md", markdown(params, rows, chosen, now, seeds, n_excluded))
        write_json(tmp / "results.json", {"comparison": params.evaluation.lr_search.comparison, "seeds": list(seeds),
                                          "grid": sorted(grid_results), "chosen": chosen, "params_now": now,
                                          "excluded_labels": n_excluded, "rows": rows,
                                          "runs": [r for lr in sorted(grid_results) for r in grid_results[lr]]})
        save_png(plot_search(rows, chosen), tmp / "plots" / "lr_search.png")
    return {"report": str(out / "README.md"), "chosen": chosen, "now": now, "rows": rows}
