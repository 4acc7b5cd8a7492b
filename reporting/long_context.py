"""The report of a long-context comparison: ``reports/<name>/`` (issue #16).

A method reads a long document hiding a few facts, then answers a question about them with
no document in the prompt (in_context and retrieval: with the document's tail or its nearest
piece instead; facts_only, the ceiling: with the facts alone); the answer is the best candidate by ``long_context.scoring`` (PMI by default,
model/evaluation/long_context.py ``answer``). A document is one
(seed, task, item_id, length): the unit of every CI and of every pairing between methods.

- ``README.md``: accuracy per method and context length, mean [95% CI] over documents pooled
  over seeds; accuracy per method and bAbI task; the targets (met yes / **no**); cost; runs.
- ``metrics.json`` (DVC metrics): per method, accuracy overall, by length and by task; the targets.
- ``results.json``: ``{"runs": results}`` and the summary.
- ``runs.csv`` (a row per run: method, seed, accuracy, documents, gradient_steps, seconds;
  final_accuracy = accuracy, for evaluation/dvc.yaml's plot) and ``accuracy.csv`` (a row per
  document per method: method, seed, task, item_id, length, correct, facts_in_window; after_task
  = 1 and accuracy = correct, the columns evaluation/dvc.yaml plots for every comparison).
- ``plots/accuracy_by_length.png``: accuracy against context length, a line per method with its
  CI, chance dashed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from model.config import LONG_CONTEXT_METHODS, Params
from model.io import atomic_dir, write_json, write_text
from reporting.common import ci_summary, error_bars, format_ci, paired_ci
from reporting.figures import COLORS, figure_style, save_png

#: The methods in report order (model/evaluation/long_context_methods.py METHODS, not imported: it loads torch).
METHODS = ("facts_only", "in_context", "retrieval", "finetune", "cms", "sleep_1", "sleep_2", "sleep_3")
#: The methods that train on the document and answer with no document in the prompt.
READING_METHODS = ("finetune", "cms", "sleep_1", "sleep_2", "sleep_3")
SLEEP_METHODS = ("sleep_1", "sleep_2", "sleep_3")
#: Lengths (tokens) from which sleep must beat the other reading methods; the drop is measured between them.
LONG, LONGEST = 4096, 65536
MAX_DROP = 0.10

Key = tuple[int, str, str, int]  # (seed, task, item_id, length)


def length_label(n: int) -> str:
    """``4096`` -> ``4k``; a length that is no whole number of k stays as it is."""
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def ordered(methods: Sequence[str], results: Sequence[dict]) -> list[str]:
    """``methods`` that have runs in ``results``: those of METHODS in its order, then the rest as given."""
    have = {r["method"] for r in results}
    return [m for m in METHODS if m in methods and m in have] + [m for m in methods if m not in METHODS and m in have]


def documents(results: Sequence[dict], method: str, seeds: Sequence[int]) -> dict[Key, dict]:
    """{(seed, task, item_id, length): the document's row} of ``method`` on ``seeds``."""
    return {(r["seed"], d["task"], d["item_id"], int(d["length"])): d
            for r in results if r["method"] == method and r["seed"] in seeds for d in r["documents"]}


def _acc(docs: Sequence[dict]) -> dict[str, float | None] | None:
    return ci_summary([float(bool(d["correct"])) for d in docs]) if docs else None


def chance(results: Sequence[dict], seeds: Sequence[int]) -> float | None:
    """Mean of 1 / n_candidates over the distinct documents (any method's copy of each)."""
    seen: dict[Key, int] = {}
    for m in {r["method"] for r in results}:
        seen.update({k: int(d["n_candidates"]) for k, d in documents(results, m, seeds).items()})
    return float(np.mean([1 / n for n in seen.values()])) if seen else None


def summarise_long_context(results: Sequence[dict], methods: Sequence[str], seeds: Sequence[int]) -> dict[str, Any]:
    """Per method: accuracy overall, by length and by task (mean and 95% CI over documents pooled over
    seeds), documents, gradient steps and sleeps per document, minutes (run seconds summed / 60)."""
    out: dict[str, Any] = {}
    for m in ordered(methods, results):
        runs = [r for r in results if r["method"] == m and r["seed"] in seeds]
        docs = list(documents(results, m, seeds).values())
        lengths = sorted({int(d["length"]) for d in docs})
        tasks = sorted({d["task"] for d in docs})
        n = len(docs)
        out[m] = {
            "accuracy": _acc(docs),
            "by_length": {str(L): _acc([d for d in docs if int(d["length"]) == L]) for L in lengths},
            "by_task": {t: _acc([d for d in docs if d["task"] == t]) for t in tasks},
            "documents": n,
            "gradient_steps_per_document": sum(d.get("gradient_steps", 0) for d in docs) / n if n else 0.0,
            "sleeps_per_document": sum(d.get("sleeps", 0) for d in docs) / n if n else 0.0,
            "minutes": sum(r["seconds"] for r in runs) / 60,
            "seeds": [r["seed"] for r in runs],
        }
    return out


def _pair(a: dict[Key, dict], b: dict[Key, dict], keys: set[Key] | None = None) -> dict[str, Any]:
    """a - b in correctness over their common documents (within ``keys``): n, mean, low, high, above_zero."""
    common = sorted(set(a) & set(b) & (keys if keys is not None else set(a)))
    if not common:
        return {"n": 0, "mean": None, "low": None, "high": None, "above_zero": False, "missing": "no document in common"}
    c = paired_ci([float(bool(a[k]["correct"])) for k in common], [float(bool(b[k]["correct"])) for k in common])
    return {"n": len(common), **c, "above_zero": c["low"] is not None and c["low"] > 0, "missing": None}


def _absent(why: str) -> dict[str, Any]:
    return {"n": 0, "mean": None, "low": None, "high": None, "above_zero": False, "missing": why}


def target_checks(results: Sequence[dict], seeds: Sequence[int], lengths: Sequence[int]) -> dict[str, Any]:
    """The targets of issue #16, each entry with ``missing`` naming what it lacked (None when checked).

    ``versus_reading``: sleep_L - cms and sleep_L - finetune at each length >= LONG, paired over documents.
    ``versus_in_context``: sleep_L - in_context over the documents whose facts lay outside in_context's
    window (its own ``facts_in_window``), all lengths. ``drop``: sleep_L's accuracy at LONG minus at
    LONGEST, met below MAX_DROP. ``more_levels``: sleep_2 - sleep_1 and sleep_3 - sleep_1 pooled over
    lengths; more levels help when either interval lies above zero.
    """
    have = {r["method"] for r in results}
    docs = {m: documents(results, m, seeds) for m in METHODS if m in have}
    sleeps = [m for m in SLEEP_METHODS if m in have]
    out: dict[str, Any] = {"versus_reading": [], "versus_in_context": [], "drop": [], "more_levels": None,
                           "missing": None if sleeps else "no sleep method in the comparison"}
    long = [L for L in sorted(lengths) if L >= LONG]
    at = lambda m, L: {k: d for k, d in docs[m].items() if k[3] == L}  # noqa: E731
    for L in long:
        for s in sleeps:
            for other in ("cms", "finetune"):
                base = {"a": s, "b": other, "length": L}
                if other not in docs:
                    out["versus_reading"].append({**base, **_absent(f"{other} is not in the comparison")})
                elif not at(s, L):
                    out["versus_reading"].append({**base, **_absent(f"{s} has no documents at {L} tokens")})
                elif not at(other, L):
                    out["versus_reading"].append({**base, **_absent(f"{other} has no documents at {L} tokens")})
                else:
                    out["versus_reading"].append({**base, **_pair(at(s, L), at(other, L))})
    for s in sleeps:
        if "in_context" not in docs:
            out["versus_in_context"].append({"a": s, "b": "in_context", **_absent("in_context is not in the comparison")})
            continue
        outside = {k for k, d in docs["in_context"].items() if not d.get("facts_in_window", False)}
        pair = _pair(docs[s], docs["in_context"], outside)
        if pair["n"] == 0:
            pair["missing"] = "no document of both with its facts outside the window"
        out["versus_in_context"].append({"a": s, "b": "in_context", **pair})
    for s in sleeps:
        row: dict[str, Any] = {"method": s, "at_long": None, "at_longest": None, "drop": None, "met": False,
                               "missing": None}
        absent = [L for L in (LONG, LONGEST) if L not in lengths]
        empty = [L for L in (LONG, LONGEST) if L in lengths and not at(s, L)]
        if absent:
            row["missing"] = "the comparison has no length " + " or ".join(str(L) for L in absent)
        elif empty:
            row["missing"] = f"{s} has no documents at " + " or ".join(str(L) for L in empty) + " tokens"
        else:
            a, b = (float(np.mean([bool(d["correct"]) for d in at(s, L).values()])) for L in (LONG, LONGEST))
            row.update(at_long=a, at_longest=b, drop=a - b, met=a - b < MAX_DROP)
        out["drop"].append(row)
    if "sleep_1" in docs:
        more: dict[str, Any] = {"accuracy": {s: _acc(list(docs[s].values())) for s in sleeps}, "differences": {},
                                "help": False, "missing": None}
        for s in ("sleep_2", "sleep_3"):
            more["differences"][s] = _pair(docs[s], docs["sleep_1"]) if s in docs else _absent(f"{s} is not in the comparison")
        if all(d["missing"] for d in more["differences"].values()):
            more["missing"] = "neither sleep_2 nor sleep_3 to compare with sleep_1"
        more["help"] = any(d["above_zero"] for d in more["differences"].values())
        out["more_levels"] = more
    elif sleeps:
        out["more_levels"] = {"accuracy": {}, "differences": {}, "help": False, "missing": "sleep_1 is not in the comparison"}
    return out


def _yes(ok: bool) -> str:
    return "yes" if ok else "**no**"


def _diff_line(c: dict[str, Any], what: str) -> str:
    if c["missing"]:
        return f"- {what}: not checked, {c['missing']}."
    return (f"- {what}, paired over {c['n']} documents: {format_ci(c)}; interval above zero: {_yes(c['above_zero'])}")


def targets_markdown(t: dict[str, Any]) -> list[str]:
    """The ``## Targets`` section."""
    lines = ["## Targets", ""]
    if t["missing"]:
        return lines + [f"Not checked: {t['missing']}.", ""]
    lines += ["Sleep against the other reading methods at long contexts (correct = 1, paired by document):"]
    if not t["versus_reading"]:
        lines.append(f"- not checked: no length of {LONG} tokens or more.")
    for c in t["versus_reading"]:
        lines.append(_diff_line(c, f"{c['a']} − {c['b']} at {length_label(c['length'])} ({c['length']} tokens)"))
    lines += ["", "Sleep against reading the tail of the document, on the documents whose facts lie outside the window:"]
    for c in t["versus_in_context"]:
        lines.append(_diff_line(c, f"{c['a']} − {c['b']}, facts outside the window"))
    lines += ["", f"Accuracy drop from {length_label(LONG)} to {length_label(LONGEST)} tokens (target: less than "
              f"{MAX_DROP:.2f}):"]
    for d in t["drop"]:
        lines.append(f"- {d['method']}: not checked, {d['missing']}." if d["missing"] else
                     f"- {d['method']}: {d['at_long']:.3f} − {d['at_longest']:.3f} = {d['drop']:+.3f}; "
                     f"less than {MAX_DROP:.2f}: {_yes(d['met'])}")
    more = t["more_levels"]
    lines += ["", "More levels (pooled over lengths):"]
    if more["missing"] and not more["accuracy"]:
        lines.append(f"- not checked: {more['missing']}.")
    else:
        lines.append("- accuracy: " + ", ".join(f"{s} {format_ci(c)}" for s, c in more["accuracy"].items() if c))
        for s, c in more["differences"].items():
            lines.append(_diff_line(c, f"{s} − sleep_1"))
        lines.append(f"- more levels help: {'yes' if more['help'] else 'no'}"
                     + (f" ({more['missing']})" if more["missing"] else ""))
    return lines + [""]


def markdown(name: str, comp: Any, summary: dict[str, Any], targets: dict[str, Any], results: Sequence[dict],
             params: Params) -> str:
    """The report's README.md."""
    lc = comp.long_context
    lengths = sorted(lc.lengths)
    ch = chance(results, comp.seeds)
    lines = [f"# Comparison `{name}`: long context", ""]
    if comp.description:
        lines += [comp.description, ""]
    lines += [f"Seeds {list(comp.seeds)}; context lengths {list(lengths)} tokens; window {lc.window} tokens; model "
              f"`{params.model.source}`. Each method reads a document hiding a few facts and answers a question on "
              "them; the answer is the best candidate by "
              + ("PMI (log-likelihood after the question minus after a content-free prompt)"
                 if getattr(lc, "scoring", "pmi") == "pmi" else "log-likelihood")
              + ". Chance (mean of 1 / candidates): "
              + (f"{ch:.3f}." if ch is not None else "–.")
              + " Accuracy: mean over documents pooled over seeds, with a 95% Student-t CI.", "",
              "| method | " + " | ".join(f"{length_label(L)} ({L})" for L in lengths) + " | all lengths |",
              "| --- | " + " | ".join("---" for _ in lengths) + " | --- |"]
    for m, s in summary.items():
        cells = [format_ci(s["by_length"][str(L)]) if s["by_length"].get(str(L)) else "–" for L in lengths]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {format_ci(s['accuracy']) if s['accuracy'] else '–'} |")
    lines += ["", "Methods: " + "; ".join(f"**{m}**: {LONG_CONTEXT_METHODS.get(m, m)}" for m in summary)]
    tasks = sorted({t for s in summary.values() for t in s["by_task"]})
    lines += ["", "Accuracy per task (all lengths):", "", "| method | " + " | ".join(tasks) + " |",
              "| --- | " + " | ".join("---" for _ in tasks) + " |"]
    for m, s in summary.items():
        lines.append(f"| {m} | " + " | ".join(format_ci(s["by_task"][t]) if s["by_task"].get(t) else "–"
                                              for t in tasks) + " |")
    lines += ["", *targets_markdown(targets)]
    lines += ["## Cost", "", "| method | documents | gradient steps / document | sleeps / document | minutes (all seeds) |",
              "| --- | --- | --- | --- | --- |"]
    for m, s in summary.items():
        lines.append(f"| {m} | {s['documents']} | {s['gradient_steps_per_document']:.1f} | "
                     f"{s['sleeps_per_document']:.1f} | {s['minutes']:.1f} |")
    lines += ["", "## Plots", "", "![accuracy by context length](plots/accuracy_by_length.png)", "", "## Runs", ""]
    for r in results:
        docs = r["documents"]
        acc = f"{np.mean([bool(d['correct']) for d in docs]):.3f}" if docs else "–"
        lines.append(f"- {r['method']}, seed {r['seed']}: accuracy {acc}, {len(docs)} documents · "
                     f"{r['gradient_steps']} steps · {r['seconds']:.0f} s"
                     + (" · **unfinished**: the documents read so far (`--report-only`)" if r.get("partial") else ""))
    return "\n".join(lines) + "\n"


def plot_accuracy_by_length(summary: dict[str, Any], lengths: Sequence[int], chance_level: float | None) -> Figure:
    """Accuracy against context length (log 2 axis), a line per method with 95% CI error bars; chance dashed."""
    lengths = sorted(lengths)
    with figure_style():
        fig = Figure(figsize=(6.4, 4.2), layout="constrained")
        ax = fig.subplots()
        n = len(summary)
        for i, (m, s) in enumerate(summary.items()):
            xs = [L for L in lengths if s["by_length"].get(str(L))]
            if not xs:
                continue
            cs = [s["by_length"][str(L)] for L in xs]
            shift = 2 ** (0.05 * (i - (n - 1) / 2))  # a small offset so the error bars do not overlap
            style = ":" if m == "facts_only" else "--" if m in ("in_context", "retrieval") else "-"
            ax.errorbar([x * shift for x in xs], [c["mean"] for c in cs], yerr=error_bars(cs), marker="o", markersize=4,
                        capsize=3, color=COLORS[i % len(COLORS)], linestyle=style, label=m)
        if chance_level is not None:
            ax.axhline(chance_level, color="#444444", linestyle="--", linewidth=0.8, label="chance")
        ax.set_xscale("log", base=2)
        ticks = sorted(set(lengths) | {4 ** k for k in range(40) if lengths[0] <= 4 ** k <= lengths[-1]}) if lengths else []
        ax.set_xticks(ticks, [length_label(L) for L in ticks])
        ax.minorticks_off()
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("accuracy (95% CI over documents)")
        ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7)
        fig.suptitle("Answering after reading a long document")
    return fig


def frames(results: Sequence[dict]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """runs.csv (a row per run) and accuracy.csv (a row per document per method)."""
    runs = pd.DataFrame([{"method": r["method"], "seed": r["seed"],
                          "accuracy": float(np.mean([bool(d["correct"]) for d in r["documents"]])) if r["documents"] else None,
                          "documents": len(r["documents"]), "gradient_steps": r["gradient_steps"],
                          "seconds": r["seconds"]} for r in results])
    if not runs.empty:
        runs["final_accuracy"] = runs["accuracy"]
    acc = pd.DataFrame([{"method": r["method"], "seed": r["seed"], "task": d["task"], "item_id": d["item_id"],
                         "length": int(d["length"]), "correct": int(bool(d["correct"])),
                         "facts_in_window": int(bool(d.get("facts_in_window", False))), "after_task": 1,
                         "accuracy": int(bool(d["correct"]))} for r in results for d in r["documents"]])
    return runs, acc


def write_long_context_report(params: Params, root: Path, comp: Any, results: list[dict]) -> dict[str, Any]:
    """Write ``reports/<name>/`` of a long-context comparison as a whole, atomically; return the summary."""
    name = comp.name + ("-quick" if comp.quick else "")
    out = root / params.evaluation.reports_dir / name
    overrides = getattr(comp, "overrides", None)
    run_params = params.for_run(overrides, f"evaluation.comparisons.{comp.name}.overrides") if overrides else params
    lengths = sorted(comp.long_context.lengths)
    summary = summarise_long_context(results, comp.methods, comp.seeds)
    targets = target_checks(results, comp.seeds, lengths)
    ch = chance(results, comp.seeds)
    runs, acc = frames(results)
    metrics = {m: {k: s[k] for k in ("accuracy", "by_length", "by_task", "documents", "gradient_steps_per_document",
                                     "sleeps_per_document", "minutes")} for m, s in summary.items()}
    with atomic_dir(out) as tmp:
        write_text(tmp / "README.md", markdown(name, comp, summary, targets, results, run_params))
        write_json(tmp / "metrics.json", {"comparison": name, "kind": "long_context", "seeds": list(comp.seeds),
                                          "lengths": lengths, "window": comp.long_context.window, "chance": ch,
                                          "methods": metrics, "targets": targets})
        write_json(tmp / "results.json", {"comparison": name, "summary": summary, "runs": results})
        write_text(tmp / "runs.csv", runs.to_csv(index=False))
        write_text(tmp / "accuracy.csv", acc.to_csv(index=False))
        save_png(plot_accuracy_by_length(summary, lengths, ch), tmp / "plots" / "accuracy_by_length.png")
    return {"report": str(out / "README.md"), "summary": summary, "targets": targets, "chance": ch}
