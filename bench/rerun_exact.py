"""Does one stage of a sleep rerun to the byte on this machine? Reruns a consolidation in fresh processes.

A comparison's run is one draw only if the same inputs can give another output: then two methods that share a
code path up to some stage may part there by chance, not by their switches. This reruns the consolidation of
one period of a (finished or running) comparison run, from that run's own wake state and params, ``--repeats``
times per variant, each in a fresh copy and a fresh process (``python -m flows.stage sleep --stage
consolidate``), and reports the sha256 of each consolidated ``experts.safetensors`` and the stage's seconds.
A variant is the run's own settings (``as-run``) or a change of them: ``threads`` and ``deterministic`` (torch's
deterministic algorithms, model/runtime.py) set ``wake.threads`` / ``wake.deterministic``; any other key is an
environment setting read when MKL starts, such as ``MKL_CBWR=COMPATIBLE``:

    python bench/rerun_exact.py --run state/compare/ablations-5-dev/sleep/seed-0 --period 0 --repeats 4 \\
        --side-by-side 2 --variant as-run --variant deterministic=false --variant MKL_CBWR=AUTO \\
        --out docs/results/issue13/rerun-exact/rerun_exact.json

A variant reruns exactly when all its repeats give one digest. The race that torch's deterministic algorithms
remove shows most under load: ``--side-by-side 2`` runs two reruns at once, as two comparisons or a comparison
beside a ``make run`` would. Run with ``--side-by-side 1`` on an otherwise idle machine for the seconds to mean
anything (the digests do not depend on load if the variant is exact).
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results import save_results  # noqa: E402


#: The variant keys that set a field of the run's ``wake`` params (read by every stage), with their parsers.
WAKE_KEYS = {"threads": int, "deterministic": lambda v: {"true": True, "false": False}[v.lower()]}


def parse_variant(text: str) -> tuple[dict[str, object], dict[str, str]]:
    """``as-run`` or ``[threads=N,][deterministic=true|false,][KEY=VALUE...]`` -> (wake params to set, environment
    settings; both empty for ``as-run``, the run's own params under this process's environment).
    ``threads`` and ``deterministic`` set ``wake.threads`` and ``wake.deterministic`` (model/runtime.py); any other
    key is an environment variable read when MKL starts. A part without ``=`` continues the value before it
    (``MKL_CBWR=AUTO,STRICT`` is one setting)."""
    wake, env, last = {}, {}, None
    if text == "as-run":
        return wake, env
    for part in filter(None, text.split(",")):
        key, sep, value = part.partition("=")
        if not sep and last is not None and last not in WAKE_KEYS:
            env[last] += "," + part
            continue
        if not sep or not key:
            raise ValueError(f"--variant {text!r}: {part!r} is not KEY=VALUE")
        if key in WAKE_KEYS:
            try:
                wake[key] = WAKE_KEYS[key](value)
            except (ValueError, KeyError):
                raise ValueError(f"--variant {text!r}: {key}={value!r} is not a valid {key}") from None
        else:
            env[key] = value
        last = key
    return wake, env


def with_wake(params_text: str, wake: dict[str, object]) -> str:
    """The run's params.yaml text with the ``wake`` fields in ``wake`` (e.g. threads) set, nothing else moved."""
    params = yaml.safe_load(params_text)
    if not isinstance(params, dict) or not isinstance(params.get("wake"), dict) or "threads" not in params["wake"]:
        raise ValueError("the run's params.yaml has no wake.threads to set")
    params["wake"].update(wake)
    return yaml.safe_dump(params, sort_keys=False)


def rerun(run: Path, period: int, wake: dict[str, object], env: dict[str, str], work: Path) -> dict:
    """One consolidation of ``period`` from ``run``'s wake state, in a fresh copy under ``work``."""
    work.mkdir(parents=True)
    text = (run / "params.yaml").read_text(encoding="utf-8")
    (work / "params.yaml").write_text(with_wake(text, wake) if wake else text, encoding="utf-8")
    wake_dir = Path("state/wake") / f"period-{period}"
    shutil.copytree(run / wake_dir, work / wake_dir)
    stream = Path(((yaml.safe_load(text) or {}).get("data") or {}).get("out_dir", "data/processed"))
    if not stream.is_absolute():  # a project's own run (make run), not a comparison's: its prepared stream too
        shutil.copytree(run / stream, work / stream)
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
    ap.add_argument("--run", type=Path, required=True,
                    help="a comparison run directory or a project after make run (params.yaml, state/wake)")
    ap.add_argument("--period", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variant", action="append", default=None,
                    help="as-run, or [threads=N,][deterministic=true|false,][KEY=VALUE...] (repeatable)")
    ap.add_argument("--side-by-side", type=int, default=1, metavar="N",
                    help="reruns at once (default 1). Thread timing differs under load: a rerun that is exact only "
                         "on an idle machine shows it here; seconds are then not a variant's cost alone")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/rerun_exact.json")
    args = ap.parse_args(argv)
    run = args.run.resolve()
    if not (run / "state/wake" / f"period-{args.period}").is_dir():
        ap.error(f"{run}: no wake state of period {args.period} (state/wake/period-{args.period})")
    if args.side_by_side < 1:
        ap.error("--side-by-side must be at least 1")
    variants = args.variant or ["as-run"]
    for name in variants:  # every variant checked before the first rerun starts
        try:
            parse_variant(name)
        except ValueError as e:
            ap.error(str(e))
    reps: dict[str, list[dict]] = {name: [] for name in variants}
    # round robin: a drift in the machine's load falls on every variant alike, and side by side reruns mix variants
    jobs = [(i, k, name) for i in range(args.repeats) for k, name in enumerate(variants)]
    with tempfile.TemporaryDirectory(prefix="rerun-exact-") as tmp:

        def one(job: tuple[int, int, str]) -> tuple[str, int, dict]:
            i, k, name = job
            return name, i, rerun(run, args.period, *parse_variant(name), Path(tmp) / f"{k}-{i}")

        with ThreadPoolExecutor(max_workers=args.side_by_side) as pool:
            for name, i, r in pool.map(one, jobs):
                reps[name].append(r)
                print(f"{name}: repeat {i}: {r['experts_sha256'][:12]} in {r['seconds']} s", flush=True)
    results = {}
    for name, runs in reps.items():
        digests = sorted({r["experts_sha256"] for r in runs})
        results[name] = {"repeats": runs, "distinct_outputs": len(digests), "exact": len(digests) == 1,
                         "median_seconds": sorted(r["seconds"] for r in runs)[len(runs) // 2]}
    for name, r in results.items():
        print(f"{name:40s} {r['distinct_outputs']} distinct of {args.repeats}, median {r['median_seconds']} s")
    save_results({"run": str(args.run), "period": args.period, "repeats": args.repeats,
                  "side_by_side": args.side_by_side, "variants": results}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
