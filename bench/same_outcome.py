"""Does a change leave what a sleep learns as it was? Two finished ``lm-sleep compare`` runs of ``sleep``, paired.

A change that only regroups the arithmetic (which rows share a matmul, a cache instead of a recomputation) still
moves a sleep's trajectory by float rounding, and one run cannot tell that drift from harm. Run the same
comparison on the same seeds with each revision's code (e.g. in two git worktrees, on one machine), then:

    python bench/same_outcome.py --base /tmp/eq-base/state/compare/default-dev \\
        --new /tmp/eq-new/state/compare/default-dev --seeds 0 1 2 3 4 5 --tasks 2 \\
        --out docs/results/issue18/same-outcome-dev/same_outcome.json

Per seed and side: accuracy after each consolidation and dream stage, the final average accuracy, dream rewards
and stage seconds (read from each run's own files, as ``bench/sampling_dtype.py`` reads them); then new - base,
paired over the seeds, with 95% Student-t intervals.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results import save_results  # noqa: E402
from bench.sampling_dtype import paired, run_outcome  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", type=Path, required=True, help="the baseline's comparison directory (.../state/compare/NAME)")
    ap.add_argument("--new", type=Path, required=True, help="the change's comparison directory")
    ap.add_argument("--method", default="sleep")
    ap.add_argument("--seeds", nargs="+", type=int, required=True)
    ap.add_argument("--tasks", type=int, required=True, help="data.n_tasks of the runs: sleeps per run")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/same_outcome.json")
    args = ap.parse_args(argv)
    sides = {}
    for name, d in (("base", args.base), ("new", args.new)):
        missing = [s for s in args.seeds if not (d / args.method / f"seed-{s}" / "result.json").is_file()]
        if missing:
            ap.error(f"{d / args.method}: no finished run (result.json) for seeds {missing}")
        sides[name] = {s: run_outcome(d / args.method / f"seed-{s}", args.tasks) for s in args.seeds}
    base, new, seeds = sides["base"], sides["new"], args.seeds
    diff = {key: paired([base[s][key] for s in seeds], [new[s][key] for s in seeds])
            for key in ("final_accuracy", "rewarded_share", "mean_tau_gain")}
    for key in ("after_consolidation", "after_dreaming"):
        for period in range(args.tasks):
            diff[f"{key}_{period}"] = paired([(base[s][key] + [None] * args.tasks)[period] for s in seeds],
                                             [(new[s][key] + [None] * args.tasks)[period] for s in seeds])
    speed = {key: {"base": round(sum(base[s][key] for s in seeds), 1), "new": round(sum(new[s][key] for s in seeds), 1)}
             for key in ("consolidation_seconds", "dreaming_seconds")}
    print(f"{'seed':>4}  {'final base':>10} {'final new':>10}")
    for s in seeds:
        print(f"{s:>4}  {base[s]['final_accuracy']:>10} {new[s]['final_accuracy']:>10}")
    print(json.dumps({"new_minus_base": diff, "seconds": speed}, indent=1))
    save_results({"base": str(args.base), "new": str(args.new), "method": args.method, "seeds": seeds,
                  "tasks": args.tasks, "runs": sides, "new_minus_base": diff, "seconds": speed}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
