"""A comparison's runs one after the other against the same runs on N local Dask workers (issue #18).

Both sides run ``lm-sleep compare NAME`` (default: ``default --quick`` on seeds 0 and 1, the embedded model)
with the same params, each in a work directory of its own, one side after the other on the same machine:
``evaluation.workers: 1`` and ``evaluation.workers: N``. Every run uses ``--threads`` torch threads, so on a
2-core machine ``--workers 2 --threads 1`` fills the cores with two runs where the other side runs one at a time.
It reports both wall times, their ratio, the slowest single run (what N workers cannot go below) and whether
every run's result (accuracy matrix, gradient steps, losses) is the same on both sides.

    python bench/compare_scale_out.py --workers 2 --threads 1 --out docs/results/issue18/compare_scale_out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import shutil
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results import run_comparison, save_results  # noqa: E402


def side(params: dict, work: Path, name: str, args: argparse.Namespace, workers: int) -> dict:
    """One ``lm-sleep compare`` in a process of its own with ``workers``; its wall time and its runs' results."""
    p = json.loads(json.dumps(params))
    p.setdefault("wake", {})["threads"] = args.threads
    p.setdefault("evaluation", {})["workers"] = workers
    seconds = run_comparison(ROOT, p, work, f"scale-out-{name}", args.comparison,
                             ["--seeds", *map(str, args.seeds)] + (["--quick"] if args.quick else []))
    runs = {}
    for result in sorted((work / "state").rglob("result.json")):
        r = json.loads(result.read_text())
        runs[f"{r['method']}/seed-{r['seed']}"] = {k: r.get(k) for k in ("accuracy", "gradient_steps", "losses", "seconds")}
    return {"workers": workers, "seconds": round(seconds, 1), "runs": runs}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--comparison", default="default")
    ap.add_argument("--no-quick", dest="quick", action="store_false", help="the comparison's full budget")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="wake.threads of every run, on both sides")
    ap.add_argument("--out", default=str(ROOT / "bench/results/compare_scale_out.json"))
    args = ap.parse_args(argv)
    params = yaml.safe_load(Path(args.params).read_text())
    work = ROOT / "state" / "bench-scale-out"  # state/ is not in git; each side starts from nothing
    shutil.rmtree(work, ignore_errors=True)
    try:
        one = side(params, work / "one", "one", args, 1)
        many = side(params, work / "many", "many", args, args.workers)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    same = {k: {f: one["runs"][k][f] == many["runs"].get(k, {}).get(f) for f in ("accuracy", "gradient_steps", "losses")}
            for k in one["runs"]}
    slowest = max(r["seconds"] for r in one["runs"].values())
    res = {"comparison": args.comparison, "quick": args.quick, "seeds": args.seeds, "threads": args.threads,
           "cpus": os.cpu_count(), "one_by_one": one, "on_workers": many,
           "speedup": round(one["seconds"] / many["seconds"], 2), "slowest_run_seconds": slowest,
           "same_results": all(all(v.values()) for v in same.values()), "same_by_run": same}
    print(f"{len(one['runs'])} runs: one by one {one['seconds']:.0f} s, on {args.workers} workers "
          f"{many['seconds']:.0f} s ({res['speedup']:.2f}x; slowest run alone {slowest:.0f} s); "
          f"same results: {res['same_results']}")
    save_results(res, args.out)
    return 0 if res["same_results"] else 1


if __name__ == "__main__":
    sys.exit(main())
