"""Does one stage of a sleep rerun to the byte on this machine? Reruns a consolidation in fresh processes.

A comparison's run is one draw only if the same inputs can give another output: then two methods that share a
code path up to some stage may part there by chance, not by their switches. This reruns the consolidation of
one period of a (finished or running) comparison run, from that run's own wake state and params, ``--repeats``
times per variant, each in a fresh copy and a fresh process (``python -m flows.stage sleep --stage
consolidate``), and reports the sha256 of each consolidated ``experts.safetensors`` and the stage's seconds.
A variant is a thread count and environment settings read when MKL starts, such as ``MKL_CBWR=COMPATIBLE``:

    python bench/rerun_exact.py --run state/compare/ablations-5-dev/sleep/seed-0 --period 0 --repeats 4 \\
        --variant threads=2 --variant threads=1 --variant threads=2,MKL_CBWR=COMPATIBLE \\
        --out docs/results/issue13/rerun-exact/rerun_exact.json

A variant reruns exactly when all its repeats give one digest. Run it on an otherwise idle machine for the
seconds to mean anything (the digests do not depend on load if the variant is exact).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results import save_results  # noqa: E402


def parse_variant(text: str) -> tuple[int, dict[str, str]]:
    """``threads=N[,KEY=VALUE...]`` -> (N, {KEY: VALUE}); threads defaults to the run's own. A part without ``=``
    continues the value before it (``MKL_CBWR=AUTO,STRICT`` is one setting)."""
    threads, env, last = 0, {}, None
    for part in filter(None, text.split(",")):
        key, sep, value = part.partition("=")
        if not sep and last is not None and last != "threads":
            env[last] += "," + part
            continue
        if not sep or not key:
            raise ValueError(f"--variant {text!r}: {part!r} is not KEY=VALUE")
        if key == "threads":
            threads = int(value)
        else:
            env[key] = value
        last = key
    return threads, env


def with_threads(params_text: str, threads: int) -> str:
    """The run's params.yaml text with ``wake.threads`` (every stage's torch threads) set to ``threads``."""
    params = yaml.safe_load(params_text)
    if not isinstance(params, dict) or "threads" not in (params.get("wake") or {}):
        raise ValueError("the run's params.yaml has no wake.threads to set")
    params["wake"]["threads"] = threads
    return yaml.safe_dump(params, sort_keys=False)


def rerun(run: Path, period: int, threads: int, env: dict[str, str], work: Path) -> dict:
    """One consolidation of ``period`` from ``run``'s wake state, in a fresh copy under ``work``."""
    work.mkdir(parents=True)
    text = (run / "params.yaml").read_text(encoding="utf-8")
    (work / "params.yaml").write_text(with_threads(text, threads) if threads else text, encoding="utf-8")
    wake = Path("state/wake") / f"period-{period}"
    shutil.copytree(run / wake, work / wake)
    penv = {**os.environ, **env, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "flows.stage", "sleep", "--params", "params.yaml", "--period",
                           str(period), "--stage", "consolidate"], cwd=work, env=penv, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"consolidation in {work} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    experts = work / "state/consolidated" / f"period-{period}" / "experts.safetensors"
    return {"experts_sha256": hashlib.sha256(experts.read_bytes()).hexdigest(), "seconds": round(seconds, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="a comparison run directory (params.yaml, state/wake)")
    ap.add_argument("--period", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variant", action="append", default=None, help="threads=N[,KEY=VALUE...] (repeatable)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/rerun_exact.json")
    args = ap.parse_args(argv)
    run = args.run.resolve()
    if not (run / "state/wake" / f"period-{args.period}").is_dir():
        ap.error(f"{run}: no wake state of period {args.period} (state/wake/period-{args.period})")
    variants = args.variant or ["threads=0"]
    for name in variants:  # every variant checked before the first rerun starts
        try:
            parse_variant(name)
        except ValueError as e:
            ap.error(str(e))
    results = {}
    reps: dict[str, list[dict]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory(prefix="rerun-exact-") as tmp:
        for i in range(args.repeats):  # round robin: a drift in the machine's load falls on every variant alike
            for k, name in enumerate(variants):
                threads, env = parse_variant(name)
                reps[name].append(rerun(run, args.period, threads, env, Path(tmp) / f"{k}-{i}"))
                print(f"{name}: repeat {i}: {reps[name][-1]['experts_sha256'][:12]} in {reps[name][-1]['seconds']} s",
                      flush=True)
    results = {}
    for name, runs in reps.items():
        digests = sorted({r["experts_sha256"] for r in runs})
        results[name] = {"repeats": runs, "distinct_outputs": len(digests), "exact": len(digests) == 1,
                         "median_seconds": sorted(r["seconds"] for r in runs)[len(runs) // 2]}
    for name, r in results.items():
        print(f"{name:40s} {r['distinct_outputs']} distinct of {args.repeats}, median {r['median_seconds']} s")
    save_results({"run": str(args.run), "period": args.period, "repeats": args.repeats, "variants": results}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
