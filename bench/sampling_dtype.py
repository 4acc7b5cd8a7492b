"""Does a sleep's outcome change when its decoder runs in bf16? (issue #18)

Runs ``lm-sleep compare default --methods sleep`` on the same seeds twice, one side with
``sampling.dtype: float32`` and one with ``sampling.dtype: bfloat16`` (everything else equal: the
comparison's budget, the model in fp32, the wake, the evaluation), each in a work directory of its
own, one side after the other on the same machine. Every sample of the sleep goes through the
sampler (teacher, on-policy and imitation samples of consolidation, rehearsal dreams, dreams), so
this side-by-side is the whole effect of the decoder's dtype on what a sleep learns.

Per seed and side it reports, from each run's own files: accuracy after each consolidation and
after each dream stage (every seen task among all seen labels: ``lifecycle.diagnostics``), the final
average accuracy, the share of tried dreams that were rewarded and their mean tau gain, and the
seconds of consolidation and of dreaming. The check: bf16 - fp32, paired over seeds, with a 95%
Student-t interval for each outcome; "no change beyond seed noise" means the interval holds 0 and
its width is what seeds vary by.

    python bench/sampling_dtype.py --seeds 0 1 2 --tasks 2 --out docs/results/issue18/sampling_dtype.json

A default is a choice: make it on development streams (``--dev``: labels no evaluation stream uses),
never on the evaluation streams. ``--keep`` keeps the work directories and reuses every run that
finished there, so an interrupted check resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results import run_comparison, save_results  # noqa: E402
from model.evaluation.continual import paired_difference_ci  # noqa: E402

SIDES = ("float32", "bfloat16")


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _mean(values: list[float]) -> float | None:
    return round(statistics.fmean(values), 4) if values else None


def run_outcome(rdir: Path, n_periods: int) -> dict:
    """One sleep run's outcome from its own files: accuracies per state, dream rewards, stage seconds."""
    result = _json(rdir / "result.json")
    diag = result.get("diagnostics") or []
    acc = lambda d: _mean(list(d.values())) if d else None  # noqa: E731  (mean over seen tasks)
    tried, rewarded, gains = 0, 0, []
    for period in range(n_periods):
        table = rdir / "dreams" / "dreaming" / f"period-{period}-dreams.parquet"
        if table.is_file():
            d = pd.read_parquet(table, columns=["reward", "tau_before", "tau_after"])
            d = d[d["reward"].notna()]
            tried += len(d)
            rewarded += int((d["reward"] == 1.0).sum())
            gains += (d["tau_after"] - d["tau_before"]).astype(float).tolist()
    timings = rdir / "metrics" / "timings"
    cons = sum(c.get("seconds", 0.0) for p in range(n_periods)
               for c in _json(timings / f"consolidation-period-{p}.json").get("consolidations", []))
    dream = sum(_json(timings / f"dreaming-period-{p}.json").get("seconds", 0.0) for p in range(n_periods))
    final = result.get("accuracy", [{}])[-1]
    return {
        "after_consolidation": [acc(d.get("after_consolidation")) for d in diag],
        "after_dreaming": [acc(d.get("after_dreaming")) for d in diag],
        "final_accuracy": acc(final),
        "dreams_tried": tried, "dreams_rewarded": rewarded,
        "rewarded_share": round(rewarded / tried, 4) if tried else None,
        "mean_tau_gain": _mean(gains),
        "consolidation_seconds": round(cons, 1), "dreaming_seconds": round(dream, 1),
    }


def side(params: dict, work: Path, dtype: str, args: argparse.Namespace) -> dict:
    """``lm-sleep compare`` with ``sampling.dtype: dtype`` in a process and work directory of its own."""
    p = json.loads(json.dumps(params))
    p.setdefault("sampling", {})["dtype"] = dtype
    comp = p["evaluation"]["comparisons"][args.comparison]
    comp.setdefault("overrides", {}).setdefault("data", {})["n_tasks"] = args.tasks
    p["evaluation"]["workers"] = 1
    seconds = run_comparison(ROOT, p, work, f"sampling-dtype-{dtype}", args.comparison,
                             ["--methods", "sleep", "--seeds", *map(str, args.seeds), *(["--dev"] if args.dev else [])])
    name = f"{args.comparison}-dev" if args.dev else args.comparison
    runs = {s: run_outcome(work / "state" / name / "sleep" / f"seed-{s}", args.tasks) for s in args.seeds}
    return {"dtype": dtype, "seconds": round(seconds, 1), "runs": runs}


def paired(a: list[float | None], b: list[float | None]) -> dict | None:
    """b - a over the pairs where both exist: mean and 95% paired Student-t interval (no bounds for one pair)."""
    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    if not pairs:
        return None
    mean, lo, hi = paired_difference_ci([y for _, y in pairs], [x for x, _ in pairs])
    bounds = {} if math.isnan(lo) else {"lo": round(lo, 4), "hi": round(hi, 4)}
    return {"mean": round(mean, 4), **bounds, "n": len(pairs)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--comparison", default="default")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--tasks", type=int, default=2, help="data.n_tasks of the stream: sleeps per run")
    ap.add_argument("--dev", action="store_true", help="on the comparison's development streams (NAME-dev)")
    ap.add_argument("--keep", action="store_true", help="keep the runs' work directories (state/bench-sampling-dtype) "
                    "and reuse the runs that finished there (resume)")
    ap.add_argument("--out", default=str(ROOT / "bench/results/sampling_dtype.json"))
    args = ap.parse_args(argv)
    params = yaml.safe_load(Path(args.params).read_text())
    work = ROOT / "state" / "bench-sampling-dtype"  # state/ is not in git; each side starts from nothing
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    try:
        sides = {dtype: side(params, work / dtype, dtype, args) for dtype in SIDES}
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    fp, bf = sides["float32"]["runs"], sides["bfloat16"]["runs"]
    seeds = args.seeds
    check = {}
    for key in ("final_accuracy", "rewarded_share", "mean_tau_gain"):
        check[key] = paired([fp[s][key] for s in seeds], [bf[s][key] for s in seeds])
    for key in ("after_consolidation", "after_dreaming"):
        for period in range(args.tasks):
            check[f"{key}_{period}"] = paired([(fp[s][key] + [None] * args.tasks)[period] for s in seeds],
                                              [(bf[s][key] + [None] * args.tasks)[period] for s in seeds])
    speed = {}
    for key in ("consolidation_seconds", "dreaming_seconds"):
        f, b = sum(fp[s][key] for s in seeds), sum(bf[s][key] for s in seeds)
        speed[key.replace("_seconds", "")] = {"float32": round(f, 1), "bfloat16": round(b, 1),
                                              "speedup": round(f / b, 2) if b else None}
    res = {"comparison": args.comparison, "dev": args.dev, "tasks": args.tasks, "seeds": seeds, "cpus": os.cpu_count(),
           "sides": sides, "bf16_minus_fp32": check, "speed": speed}
    save_results(res, args.out)
    print(json.dumps({"bf16_minus_fp32": check, "speed": speed}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
