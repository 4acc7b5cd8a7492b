"""The report of a knowledge-incorporation comparison: ``reports/<name>/`` (docs/design.md §5).

- ``README.md``: one row per method: no-context exact match, token F1 and tau, each
  mean [95% CI] -- over passages in single mode (each passage's value averaged over
  seeds), over seeds in continued mode (each seed's mean over passages); then each
  method's gain over ``base`` with a paired CI (paired by passage, or by seed), the
  training steps and seconds per passage, and the funnel of the dreams.
- ``metrics.json`` (DVC metrics): per method, the means, CIs and gains.
- ``runs.csv`` (a row per run: method, seed, final_accuracy = mean exact match, f1, tau,
  steps, seconds) and ``accuracy.csv`` (a row per run and passage: after_task = passages
  learned when it was measured, task = the passage's index, accuracy = its exact match,
  f1, tau): the same files and columns DVC plots for the continual comparisons
  (``evaluation/dvc.yaml``), so one stage covers both kinds. ``tau_curve.csv``
  (continued, if ``tau_every``): mean tau over the passages learned so far.
- ``plots/``: ``measures.png`` (bars with 95% CI error bars per method: EM, F1, tau),
  ``gain.png`` (gain over base with paired CIs), ``tau_curve.png`` (continued).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from model.config import KNOWLEDGE_METHODS, Params
from model.evaluation.incorporation import MEASURES
from model.io import atomic_dir, write_json, write_text
from reporting.common import ci_summary, error_bars, format_ci, paired_ci
from reporting.figures import COLORS, figure_style, save_png

LABELS = {"em": "exact match", "f1": "token F1", "tau": "tau (answer log-lik / token)"}


def units(results: Sequence[dict], method: str, seeds: Sequence[int], mode: str) -> dict[str, list[float]]:
    """The values a CI is taken over, per measure: per passage (mean over seeds) in single mode,
    per seed (mean over passages) in continued mode. Passages in index order, seeds in ``seeds`` order."""
    runs = {r["seed"]: r for r in results if r["method"] == method}
    runs = [runs[s] for s in seeds if s in runs]
    if mode == "single":
        index = [row["index"] for row in runs[0]["passages"]]
        return {k: [float(np.mean([next(row[k] for row in r["passages"] if row["index"] == i) for r in runs]))
                    for i in index] for k in MEASURES}
    return {k: [float(np.mean([row[k] for row in r["passages"]])) for r in runs] for k in MEASURES}


FUNNEL = ("generated", "selected", "rewarded", "passed_gate", "promoted", "trained")


def _funnel_order(key: str) -> tuple[int, str]:
    """The dream funnel's stages in the order dreams pass them; anything else after them, by name."""
    return (FUNNEL.index(key), "") if key in FUNNEL else (len(FUNNEL), key)


def summarise_knowledge(results: Sequence[dict], methods: Sequence[str], seeds: Sequence[int], mode: str) -> dict[str, Any]:
    """Per method: each measure's mean and 95% CI, the gain over base (paired CI), steps, seconds, funnel."""
    out: dict[str, Any] = {}
    values = {m: units(results, m, seeds, mode) for m in methods if any(r["method"] == m for r in results)}
    for m, vals in values.items():
        runs = [r for r in results if r["method"] == m]
        n_passages = sum(len(r["passages"]) for r in runs)
        funnel: dict[str, int] = {}
        for r in runs:
            for k, v in (r.get("funnel") or {}).items():
                funnel[k] = funnel.get(k, 0) + int(v)
        funnel = {k: funnel[k] for k in sorted(funnel, key=_funnel_order)}  # the same order from a result.json
        out[m] = {
            **{k: ci_summary(vals[k]) for k in MEASURES},
            "units": vals,
            "gain_over_base": ({k: paired_ci(vals[k], values["base"][k]) for k in MEASURES}
                               if "base" in values and m != "base" and len(vals["tau"]) == len(values["base"]["tau"])
                               else None),
            "gradient_steps_per_passage": sum(r["gradient_steps"] for r in runs) / n_passages,
            "seconds_per_passage": sum(r["seconds"] for r in runs) / n_passages,
            "seeds": [r["seed"] for r in runs],
            "funnel": funnel or None,
        }
    return out


def markdown(name: str, description: str, summary: dict[str, Any], knowledge: Any, seeds: Sequence[int],
             results: Sequence[dict], params: Params, policies: Sequence[dict] = ()) -> str:
    """The report's README.md."""
    mode = knowledge.mode
    over = "passages (each passage's value averaged over seeds)" if mode == "single" else "seeds (each seed's mean over passages)"
    lines = [f"# Comparison `{name}`: knowledge incorporation ({mode})", ""]
    if description:
        lines += [description, ""]
    lines += [
        f"{knowledge.n_passages} passages of `{Path(knowledge.passages).name}` from index {knowledge.offset}; "
        + ("each passage learned from the same fresh state and its questions answered right after (n=1)"
           if mode == "single" else "one state learns them one after the other (continued pretraining) and answers "
           "every passage's questions at the end" + {
               "sleep": " (the methods that sleep end each passage in its own read-only expert and answer every question "
                        "with the expert of the passage it is routed to; the others train one shared fast level)",
               "all": " (every method that learns ends each passage in its own read-only expert and answers every question "
                      "with the expert of the passage it is routed to)",
               "none": " (every method trains one shared fast level)"}[knowledge.passage_experts])
        + f"; seeds {list(seeds)}; model `{params.model.source}`. Questions are answered without the passage: "
        "greedy exact match and token F1 (model/evaluation/grading.py), and tau = mean log-likelihood per gold-answer token. "
        f"Mean over {over} with a 95% Student-t CI.",
        "",
        "| method | exact match | token F1 | tau | tau gain over base (paired) | F1 gain over base (paired) | "
        "gradient steps / passage | s / passage |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for m, s in summary.items():
        g = s["gain_over_base"]
        lines.append(f"| {m} | {format_ci(s['em'])} | {format_ci(s['f1'])} | {format_ci(s['tau'])} | "
                     f"{format_ci(g['tau']) if g else '--'} | {format_ci(g['f1']) if g else '--'} | "
                     f"{s['gradient_steps_per_passage']:.1f} | {s['seconds_per_passage']:.1f} |")
    lines += ["", "Methods: " + "; ".join(f"**{m}**: {KNOWLEDGE_METHODS[m]}" for m in summary), ""]
    funnels = {m: s["funnel"] for m, s in summary.items() if s["funnel"]}
    if funnels:
        lines += ["## Dreams", "", "Summed over passages and seeds.", ""]
        for m, f in funnels.items():
            lines.append(f"- {m}: " + " / ".join(f"{k} {v}" for k, v in f.items() if not k.startswith("rejected_rewarded:")))
            turned = {k.split(":", 1)[1]: v for k, v in f.items() if k.startswith("rejected_rewarded:")}
            if turned:
                lines.append(f"  - rewarded dreams (their trial raised tau) the gate rejected, by check: "
                             + ", ".join(f"{k} {v}" for k, v in sorted(turned.items())))
        lines.append("")
    if mode == "continued":
        lines += slices_markdown(results, list(summary), seeds)
    lines += checks_markdown(paired_checks(results, seeds) if mode == "single"
                             else {"tau": early_checks(results, seeds), "per_token": None})
    lines += policy_markdown(policy_rounds_frame(policies))
    lines += ["## Plots", "", "![measures per method](plots/measures.png)", "", "![gain over base](plots/gain.png)", ""]
    if any(r.get("tau_curve") for r in results):
        lines += ["![tau over passages learned](plots/tau_curve.png)", ""]
    lines += ["## Runs", ""]
    for r in results:
        em = np.mean([row["em"] for row in r["passages"]])
        tau = np.mean([row["tau"] for row in r["passages"]])
        lines.append(f"- {r['method']}, seed {r['seed']}: {len(r['passages'])} passages, mean exact match {em:.3f}, "
                     f"tau {tau:.3f} · {r['gradient_steps']} steps · {r['seconds']:.0f} s")
    return "\n".join(lines) + "\n"


#: The paired checks of issue #14 (tau, single mode): (name, method a, method b), a - b above zero is the target.
TAU_CHECKS = (("trained-policy sleep - passage fine-tuning", "passage_sleep_trained", "passage_finetune"),
              ("trained-policy sleep - untrained-policy sleep", "passage_sleep_trained", "passage_sleep"),
              ("untrained-policy sleep - passage fine-tuning", "passage_sleep", "passage_finetune"),
              ("passage + all dreams - passage fine-tuning", "passage_dreams", "passage_finetune"))


def _per_passage(results: Sequence[dict], method: str, seeds: Sequence[int], key: str) -> dict[int, float]:
    """{passage index: ``key`` averaged over the method's seeds} (single mode)."""
    runs = [r for r in results if r["method"] == method and r["seed"] in seeds]
    out: dict[int, list[float]] = {}
    for r in runs:
        for row in r["passages"]:
            out.setdefault(row["index"], []).append(float(row.get(key, 0) or 0))
    return {i: float(np.mean(v)) for i, v in out.items()}


#: Continued pretraining (issue #14): what the first EARLY passages keep once every passage is learned.
EARLY = 10
CPT_CHECKS = (("trained-policy sleep - passage fine-tuning, first passages", "passage_sleep_trained", "passage_finetune"),
              ("untrained-policy sleep - passage fine-tuning, first passages", "passage_sleep", "passage_finetune"),
              ("sleep - passage fine-tuning, first passages", "sleep", "passage_finetune"))


def early_checks(results: Sequence[dict], seeds: Sequence[int], early: int = EARLY) -> dict[str, Any]:
    """Continued mode: tau of the first ``early`` passages (in learning order) after all are learned, a - b per
    CPT_CHECKS, paired over those passages (each averaged over seeds)."""
    out: dict[str, Any] = {}
    have = {r["method"] for r in results}
    for name, a, b in CPT_CHECKS:
        if a in have and b in have:
            first = [row["index"] for row in next(r for r in results if r["method"] == a)["passages"]][:early]
            ta, tb = _per_passage(results, a, seeds, "tau"), _per_passage(results, b, seeds, "tau")
            idx = [i for i in first if i in ta and i in tb]
            out[name] = {"a": a, "b": b, "n": len(idx), **paired_ci([ta[i] for i in idx], [tb[i] for i in idx])}
    return out


def slices(results: Sequence[dict], methods: Sequence[str], seeds: Sequence[int], early: int = EARLY
           ) -> dict[str, dict[str, float | None]]:
    """Continued mode, per method: mean tau (over passages, each averaged over seeds) of the first ``early`` passages in
    learning order, of the last ``early`` and of all, once every passage is learned; and the share of questions routed
    to their own passage (``routed_own``, weighted by questions; None for a method without passage experts)."""
    out: dict[str, dict[str, float | None]] = {}
    for m in methods:
        runs = [r for r in results if r["method"] == m and r["seed"] in seeds]
        if not runs:
            continue
        order = [row["index"] for row in runs[0]["passages"]]
        tau = _per_passage(results, m, seeds, "tau")
        rows = [row for r in runs for row in r["passages"]]
        routed = [(row["routed_own"], row["n_questions"]) for row in rows if "routed_own" in row]
        out[m] = {"first": float(np.mean([tau[i] for i in order[:early]])),
                  "last": float(np.mean([tau[i] for i in order[-early:]])),
                  "all": float(np.mean([tau[i] for i in order])),
                  "routed_own": (sum(x * n for x, n in routed) / sum(n for _, n in routed)) if routed else None}
    return out


def slices_markdown(results: Sequence[dict], methods: Sequence[str], seeds: Sequence[int], early: int = EARLY
                    ) -> list[str]:
    """The continued-mode table of :func:`slices`."""
    table = slices(results, methods, seeds, early)
    lines = ["## Early and late passages", "",
             f"Tau once every passage is learned: the first {early} passages learned, the last {early}, all; and the "
             "questions routed to their own passage's expert (passage experts only, model/memory/passage_experts.py).",
             "", f"| method | first {early} | last {early} | all | routed to their own passage |",
             "| --- | --- | --- | --- | --- |"]
    for m, t in table.items():
        own = "--" if t["routed_own"] is None else f"{t['routed_own']:.3f}"
        lines.append(f"| {m} | {t['first']:.3f} | {t['last']:.3f} | {t['all']:.3f} | {own} |")
    return lines + [""]


def paired_checks(results: Sequence[dict], seeds: Sequence[int]) -> dict[str, Any]:
    """Issue #14's paired checks over passages (single mode; the methods present only).

    ``tau``: a - b per TAU_CHECKS. ``per_token``: what the dreams add over the wake (tau of the method
    minus passage_finetune's) per 1000 dream tokens trained, promoted dreams (passage_sleep) against all
    dreams (passage_dreams), paired over the passages where both trained at least one dream token.
    """
    out: dict[str, Any] = {"tau": {}, "per_token": None}
    have = {r["method"] for r in results}
    for name, a, b in TAU_CHECKS:
        if a in have and b in have:
            ta, tb = _per_passage(results, a, seeds, "tau"), _per_passage(results, b, seeds, "tau")
            idx = sorted(set(ta) & set(tb))
            out["tau"][name] = {"a": a, "b": b, "n": len(idx), **paired_ci([ta[i] for i in idx], [tb[i] for i in idx])}
    if {"passage_sleep", "passage_dreams", "passage_finetune"} <= have:
        ft = _per_passage(results, "passage_finetune", seeds, "tau")
        eff = {}
        for m in ("passage_sleep", "passage_dreams"):
            tau, tok = _per_passage(results, m, seeds, "tau"), _per_passage(results, m, seeds, "dream_tokens")
            eff[m] = {i: 1000 * (tau[i] - ft[i]) / tok[i] for i in tau if i in ft and tok.get(i, 0) > 0}
        idx = sorted(set(eff["passage_sleep"]) & set(eff["passage_dreams"]))
        out["per_token"] = {"n": len(idx), "promoted": ci_summary([eff["passage_sleep"][i] for i in idx]) if idx else None,
                            "all": ci_summary([eff["passage_dreams"][i] for i in idx]) if idx else None,
                            "difference": paired_ci([eff["passage_sleep"][i] for i in idx],
                                                  [eff["passage_dreams"][i] for i in idx]) if len(idx) > 1 else None}
    return out


def checks_markdown(checks: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    if checks["tau"]:
        lines += ["## Paired checks (issue #14)", "", "| check | passages | tau difference [95% CI] | above zero |",
                  "| --- | --- | --- | --- |"]
        for name, c in checks["tau"].items():
            above = "yes" if c["low"] is not None and c["low"] > 0 else "no"
            lines.append(f"| {name} | {c['n']} | {format_ci(c)} | {above} |")
        lines.append("")
    pt = checks.get("per_token")
    if pt and pt["difference"]:
        d = pt["difference"]
        lines += [f"Tau gain over the wake per 1000 dream tokens trained, over the {pt['n']} passages where both "
                  f"trained a dream: promoted dreams {format_ci(pt['promoted'])}, all dreams {format_ci(pt['all'])}; "
                  f"promoted - all {format_ci(d)} (above zero: {'yes' if d['low'] is not None and d['low'] > 0 else 'no'}).",
                  ""]
    return lines


def policy_rounds_frame(policies: Sequence[dict]) -> pd.DataFrame:
    """One row per seed, round and split of the dream policy's training (tasks/knowledge.py train_dream_policy)."""
    return pd.DataFrame([{"seed": pr["seed"], **{k: v for k, v in r.items() if k != "update_loss"}}
                         for pr in policies for r in pr["rounds"]])


def policy_markdown(frame: pd.DataFrame) -> list[str]:
    if frame.empty:
        return []
    lines = ["## The dream policy's training (ReST-EM rounds)", "",
             "Round r is measured with the policy after r updates (round 0: untrained); train: the training pool, "
             "eval: evaluation passages, policy frozen (never trained on). Means over seeds.", "",
             "| round | split | dreams tried | share rewarded | mean tau gain of a trial | tokens generated |",
             "| --- | --- | --- | --- | --- | --- |"]
    g = frame.groupby(["round", "split"], sort=True).agg(dreams=("dreams", "mean"), share=("share_rewarded", "mean"),
                                                         gain=("mean_tau_gain", "mean"), tokens=("tokens", "mean"))
    for (r, split), row in g.iterrows():
        lines.append(f"| {r} | {split} | {row['dreams']:.0f} | {row['share']:.3f} | {row['gain']:+.4f} | {row['tokens']:.0f} |")
    return lines + ["", "![the policy's rounds](plots/policy_rounds.png)", ""]


def plot_policy_rounds(frame: pd.DataFrame) -> Figure:
    """Per ReST-EM round: share of rewarded dreams, mean tau gain of a trial, tokens generated (train / eval)."""
    with figure_style():
        fig = Figure(figsize=(10.0, 3.2), layout="constrained")
        for ax, (col, label) in zip(fig.subplots(1, 3), (("share_rewarded", "share of dreams rewarded"),
                                                          ("mean_tau_gain", "mean tau gain of a trial"),
                                                          ("tokens", "dream tokens generated"))):
            for k, (split, part) in enumerate(frame.groupby("split")):
                for seed, runs in part.groupby("seed"):
                    ax.plot(runs["round"], runs[col], marker="o", markersize=3, color=COLORS[k % len(COLORS)],
                            linestyle="-" if split == "train" else "--", label=f"{split}, seed {seed}")
            ax.set_xticks(sorted(frame["round"].unique()))
            ax.set_xlabel("ReST-EM updates of the policy")
            ax.set_title(label, fontsize=9)
        fig.axes[0].legend(loc="best", fontsize=7)
        fig.suptitle("Training the dream policy")
    return fig


def read_policies(comparison_dir: Path, seeds: Sequence[int]) -> list[dict]:
    """The finished policy trainings of the comparison (``policy/seed-<s>/result.json``)."""
    import json

    out = []
    for s in seeds:
        path = comparison_dir / "policy" / f"seed-{s}" / "result.json"
        if path.is_file():
            out.append(json.loads(path.read_text(encoding="utf-8")))
    return out


def _color(m: str, k: int) -> str:
    return COLORS[3] if m == "sleep" else COLORS[k % len(COLORS)]


def plot_measures(summary: dict[str, Any]) -> Figure:
    """Bars with 95% CI error bars per method: exact match, token F1, tau."""
    methods = list(summary)
    with figure_style():
        fig = Figure(figsize=(max(7.5, 1.2 * len(methods) * 3), 3.4), layout="constrained")
        for ax, k in zip(fig.subplots(1, 3), MEASURES):
            cs = [summary[m][k] for m in methods]
            ax.bar(range(len(methods)), [c["mean"] for c in cs], yerr=error_bars(cs), capsize=3,
                   color=[_color(m, i) for i, m in enumerate(methods)])
            ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right")
            ax.set_title(f"{LABELS[k]} (95% CI)", fontsize=9)
            ax.axhline(0, color="#444444", linewidth=0.6)
        fig.suptitle("No-context QA after learning the passages")
    return fig


def plot_gain(summary: dict[str, Any]) -> Figure:
    """Gain over base with paired 95% CIs, per method: exact match, token F1, tau."""
    methods = [m for m in summary if summary[m]["gain_over_base"]]
    with figure_style():
        fig = Figure(figsize=(max(7.5, 1.2 * max(1, len(methods)) * 3), 3.4), layout="constrained")
        for ax, k in zip(fig.subplots(1, 3), MEASURES):
            cs = [summary[m]["gain_over_base"][k] for m in methods]
            ax.bar(range(len(methods)), [c["mean"] for c in cs], yerr=error_bars(cs), capsize=3,
                   color=[_color(m, i + 1) for i, m in enumerate(methods)])
            ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right")
            ax.set_title(f"{LABELS[k]}: gain over base", fontsize=9)
            ax.axhline(0, color="#444444", linewidth=0.6)
        fig.suptitle("Paired difference with base (95% CI)")
    return fig


def plot_tau_curve(results: Sequence[dict], methods: Sequence[str]) -> Figure:
    """Continued mode: mean tau over the passages learned so far, after every k passages (mean over seeds)."""
    with figure_style():
        fig = Figure(figsize=(6.0, 3.6), layout="constrained")
        ax = fig.subplots()
        for i, m in enumerate(methods):
            curves = [dict((int(k), v) for k, v in r["tau_curve"]) for r in results if r["method"] == m and r["tau_curve"]]
            if not curves:
                continue
            xs = sorted(set.intersection(*(set(c) for c in curves)))
            ax.plot(xs, [np.mean([c[x] for c in curves]) for x in xs], marker="o", markersize=3, label=m,
                    color=_color(m, i))
        ax.set_xlabel("passages learned")
        ax.set_ylabel("mean tau over the passages learned")
        ax.legend(loc="best", fontsize=8)
        fig.suptitle("Continued pretraining: what is kept as passages accumulate")
    return fig


def write_knowledge_report(params: Params, root: Path, comp: Any, results: list[dict],
                           comparison_dir: Path) -> dict[str, Any]:
    """Write ``reports/<name>/`` of a knowledge comparison as a whole, atomically; return the summary.

    The dream policy's training (method passage_sleep_trained) is read from ``comparison_dir``, the
    comparison's directory (its runs)."""
    policies = read_policies(comparison_dir, comp.seeds)
    rounds = policy_rounds_frame(policies)
    checks = (paired_checks(results, comp.seeds) if comp.knowledge.mode == "single"
              else {"tau": early_checks(results, comp.seeds), "per_token": None})
    name = comp.name + ("-quick" if comp.quick else "")
    out = root / params.evaluation.reports_dir / name
    kc = comp.knowledge
    summary = summarise_knowledge(results, comp.methods, comp.seeds, kc.mode)
    run_params = params.for_run(comp.overrides, f"evaluation.comparisons.{comp.name}.overrides")
    after = 1 if kc.mode == "single" else kc.n_passages
    runs = pd.DataFrame([{"method": r["method"], "seed": r["seed"],
                          "final_accuracy": float(np.mean([row["em"] for row in r["passages"]])),
                          "f1": float(np.mean([row["f1"] for row in r["passages"]])),
                          "tau": float(np.mean([row["tau"] for row in r["passages"]])),
                          "gradient_steps": r["gradient_steps"], "seconds": r["seconds"]} for r in results])
    acc = pd.DataFrame([{"method": r["method"], "seed": r["seed"], "after_task": after, "task": row["index"],
                         "accuracy": row["em"], "f1": row["f1"], "tau": row["tau"], "title": row["title"]}
                        for r in results for row in r["passages"]])
    curve = pd.DataFrame([{"method": r["method"], "seed": r["seed"], "learned": k, "tau": v}
                          for r in results for k, v in r.get("tau_curve") or []])
    metrics = {m: {k: s[k] for k in MEASURES} | {"gain_over_base": s["gain_over_base"],
                                                 "gradient_steps_per_passage": s["gradient_steps_per_passage"],
                                                 "funnel": s["funnel"]} for m, s in summary.items()}
    with atomic_dir(out) as tmp:
        write_text(tmp / "README.md", markdown(name, comp.description, summary, kc, comp.seeds, results, run_params,
                                               policies))
        write_json(tmp / "metrics.json", {"comparison": name, "kind": "knowledge", "mode": kc.mode,
                                          "n_passages": kc.n_passages, "seeds": list(comp.seeds), "methods": metrics,
                                          "checks": checks})
        if not rounds.empty:
            write_text(tmp / "policy_rounds.csv", rounds.to_csv(index=False))
            save_png(plot_policy_rounds(rounds), tmp / "plots" / "policy_rounds.png")
        write_json(tmp / "results.json", {"comparison": name, "summary": summary, "runs": results})
        write_text(tmp / "runs.csv", runs.to_csv(index=False))
        write_text(tmp / "accuracy.csv", acc.to_csv(index=False))
        save_png(plot_measures(summary), tmp / "plots" / "measures.png")
        save_png(plot_gain(summary), tmp / "plots" / "gain.png")
        if not curve.empty:
            write_text(tmp / "tau_curve.csv", curve.to_csv(index=False))
            save_png(plot_tau_curve(results, list(summary)), tmp / "plots" / "tau_curve.png")
    return {"report": str(out / "README.md"), "summary": summary}
