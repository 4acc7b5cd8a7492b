"""Two sets of continual runs, paired over the seeds both ran: ``lm-sleep paired``.

A comparison's report pairs its own methods (reporting/comparison.py). Research here also pairs
runs that live apart: a method rerun at a later commit against the baselines of an earlier
comparison, two worktrees that each ran some seeds, a development arm against its reference.
This reads every ``result.json`` under the folders given for each side (a method's folder of a
comparison, ``state/compare/NAME/METHOD``, or any copy of it), keys the runs by their seed and
reports, per side, the final average accuracy, the earlier tasks' final accuracy (every task but the last, at
the end; not with one-task streams) and forgetting with 95% Student-t intervals over seeds, and A - B of each,
paired over the common seeds (the interval of the per-seed differences).

It refuses what would pair the wrong runs: two runs of one seed on one side, a side that mixes
methods, paired runs with different numbers of tasks, no seed in common. Runs on different
machines are paired but said so (float rounding moves a run's trajectory; docs/results.md).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from model.errors import UserError
from model.io import write_json, write_text
from reporting.comparison import run_metrics
from reporting.common import ci_summary, format_ci, paired_by_seed

RESULT_FILE = "result.json"
#: The metrics paired, with their short (table) and long (difference line) names.
PAIRED_METRICS = {"final_accuracy": ("final", "final accuracy"),
                  "earlier_accuracy": ("earlier tasks", "earlier tasks' final accuracy"),
                  "forgetting": ("forgetting", "forgetting")}


class PairedInputError(UserError, ValueError):
    """A result file or a set of runs that cannot be paired (the message names the file or the side)."""


def read_result(path: Path) -> dict:
    """One run's result.json, checked for what pairing reads: ``seed`` (int), ``method`` (str) and ``accuracy``
    (a list of {task: accuracy} rows, one per period)."""
    try:
        res = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PairedInputError(f"{path}: not a readable JSON result ({e})") from None
    if not isinstance(res, dict):
        raise PairedInputError(f"{path}: a result is a JSON object, got {type(res).__name__}")
    if not isinstance(res.get("seed"), int) or isinstance(res.get("seed"), bool):
        raise PairedInputError(f"{path}: field 'seed' must be an integer, got {res.get('seed')!r}")
    if not isinstance(res.get("method"), str):
        raise PairedInputError(f"{path}: field 'method' must be a string, got {res.get('method')!r}")
    acc = res.get("accuracy")
    if not isinstance(acc, list) or not acc or not all(isinstance(row, dict) for row in acc):
        raise PairedInputError(f"{path}: field 'accuracy' must be a non-empty list of {{task: accuracy}} rows")
    for i, row in enumerate(acc):
        for task, value in row.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
                raise PairedInputError(f"{path}: field 'accuracy[{i}][{task}]' must be a number in [0, 1], got {value!r}")
    return res


def side_runs(folders: Sequence[Path], side: str) -> dict[int, dict]:
    """seed -> run (its result, with ``path``) of every result.json under ``folders``. One method per side and one
    run per seed: anything else is a PairedInputError that names the side and the files."""
    runs: dict[int, dict] = {}
    for folder in folders:
        folder = Path(folder)
        if not folder.exists():
            raise PairedInputError(f"{side}: {folder} does not exist")
        paths = [folder] if folder.is_file() else sorted(folder.rglob(RESULT_FILE))
        if not paths:
            raise PairedInputError(f"{side}: no {RESULT_FILE} under {folder}")
        for path in paths:
            res = read_result(path)
            if res["seed"] in runs:
                raise PairedInputError(f"{side}: two runs of seed {res['seed']}: {runs[res['seed']]['path']} and {path}; "
                                       "give each side one run per seed")
            runs[res["seed"]] = {**res, "path": str(path.resolve())}
    methods = sorted({r["method"] for r in runs.values()})
    if len(methods) > 1:
        raise PairedInputError(f"{side}: runs of several methods ({', '.join(methods)}) under "
                               f"{', '.join(str(f) for f in folders)}; give a method's folder "
                               "(state/compare/NAME/METHOD)")
    return runs


def _machine(run: dict) -> str:
    return str((run.get("machine") or {}).get("id", "unknown"))


def paired_runs(a: dict[int, dict], b: dict[int, dict], labels: tuple[str, str] = ("A", "B")) -> dict[str, Any]:
    """Each side's metrics over its own seeds and A - B over the common ones.

    Returns {labels, methods, seeds: {a, b, common}, per_seed: {label: {seed: {metric: value}}},
    sides: {label: {metric: {mean, low, high}}}, difference: {metric: {mean, low, high, above_zero, below_zero}},
    machines: {label: [ids]}, same_machine}. ``difference`` is over ``common`` only; a side's own summary is over
    all its seeds.
    """
    shared = sorted({r["path"] for r in a.values()} & {r["path"] for r in b.values()})
    if shared:
        raise PairedInputError(f"{shared[0]} is on both sides: pair two different sets of runs")
    common = sorted(set(a) & set(b))
    if not common:
        raise PairedInputError(f"no seed in common: {labels[0]} ran {sorted(a)}, {labels[1]} ran {sorted(b)}")
    for s in common:
        na, nb = len(a[s]["accuracy"]), len(b[s]["accuracy"])
        if na != nb:
            raise PairedInputError(f"seed {s}: {a[s]['path']} has {na} tasks and {b[s]['path']} {nb}: "
                                   "the runs are not of one stream")
    computed = {label: {s: run_metrics(r, len(r["accuracy"])) for s, r in sorted(runs.items())}
                for label, runs in zip(labels, (a, b))}
    # a metric some run does not define (one-task runs have no earlier task) is left out for both sides
    metrics = [k for k in PAIRED_METRICS if all(m[k] is not None for side in computed.values() for m in side.values())]
    per_seed = {label: {s: {k: float(m[k]) for k in metrics} for s, m in side.items()} for label, side in computed.items()}
    sides = {label: {k: ci_summary([v[k] for v in per_seed[label].values()]) for k in metrics} for label in labels}
    difference = {k: paired_by_seed({s: v[k] for s, v in per_seed[labels[0]].items()},
                                    {s: v[k] for s, v in per_seed[labels[1]].items()}) for k in metrics}
    machines = {label: sorted({_machine(r) for r in runs.values()}) for label, runs in zip(labels, (a, b))}
    return {"labels": list(labels), "methods": {label: next(iter(runs.values()))["method"]
                                                 for label, runs in zip(labels, (a, b))},
            "seeds": {"a": sorted(a), "b": sorted(b), "common": common}, "per_seed": per_seed, "sides": sides,
            "difference": difference, "machines": machines,
            "same_machine": len(set(machines[labels[0]]) | set(machines[labels[1]])) == 1}


def paired_markdown(report: dict[str, Any]) -> str:
    """The pairing as a short Markdown report: a row per seed, each side's interval, A - B paired."""
    la, lb = report["labels"]
    common = report["seeds"]["common"]

    def named(label: str) -> str:
        method = report["methods"][label]
        return label if method == label else f"{label} ({method})"

    lines = [f"# {named(la)} against {named(lb)}", "",
             f"Seeds: {la} {report['seeds']['a']}, {lb} {report['seeds']['b']}; paired over {common}. "
             f"Machines: {la} {', '.join(report['machines'][la])}, {lb} {', '.join(report['machines'][lb])}"
             + ("" if report["same_machine"] else " (**not one machine**: float rounding alone moves a run)") + ".",
             ""]
    metrics = [k for k in PAIRED_METRICS if k in report["difference"]]
    lines += ["| seed | " + " | ".join(f"{label} {PAIRED_METRICS[k][0]}" for k in metrics for label in (la, lb)) + " |",
              "| --- |" + " --- |" * (2 * len(metrics))]
    for s in sorted(set(report["seeds"]["a"]) | set(report["seeds"]["b"])):
        cells = []
        for k in metrics:
            for label in (la, lb):
                v = report["per_seed"][label].get(s, {}).get(k)
                cells.append("–" if v is None else f"{v:.3f}")
        lines.append(f"| {s} | {' | '.join(cells)} |")
    lines.append("")
    for label in (la, lb):
        lines.append(f"- {label}: " + ", ".join(f"{PAIRED_METRICS[k][0]} {format_ci(report['sides'][label][k])}"
                                                for k in metrics))
    for k in metrics:
        d = report["difference"][k]
        where = ("one pair: no interval" if d["low"] is None else "above zero" if d["above_zero"]
                 else "below zero" if d["below_zero"] else "includes zero")
        interval = "" if d["low"] is None else f" [{d['low']:+.3f}, {d['high']:+.3f}]"
        lines.append(f"- {la} - {lb}, {PAIRED_METRICS[k][1]}, paired over {len(common)} seeds: "
                     f"{d['mean']:+.3f}{interval} ({where})")
    return "\n".join(lines) + "\n"


def write_paired(report: dict[str, Any], markdown: str, json_path: Path | None, markdown_path: Path | None) -> None:
    """Write the pairing as JSON and its Markdown report where asked (each atomically; None: not written)."""
    if json_path is not None:
        write_json(json_path, report)
    if markdown_path is not None:
        write_text(markdown_path, markdown)
