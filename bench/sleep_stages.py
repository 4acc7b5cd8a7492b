"""Where one sleep's seconds go, this checkout against a baseline revision, on the states of a real run.

A sleep is two pipeline stages, ``flows.stage sleep --stage consolidate`` and ``--stage dream``. Each side runs
both, as ``lm-sleep run`` does, on a copy of the same saved wake state of a finished run (``--root``; the embedded
default's states after ``make run``), in a child process of its own with a fresh Prefect home, one side after the
other and alternating over ``--repeats``; the baseline's code comes from ``git archive`` of ``--baseline``
(default ``HEAD``). The seconds are the stages' own (``metrics/timings/``: the work of the Prefect tasks, as
``make run`` reports a sleep). Each child also times the model functions a sleep spends its time in (sampling,
the Learning-to-Imitate pass, backward, the promotion check, ...), where that revision has them, so a change
shows where it saved. Same machine, same inputs, one run: the ratio is the figure to quote.

    make run   # or any finished lm-sleep run
    python bench/sleep_stages.py --root . --period 2 --baseline HEAD --out bench/results/sleep_stages.json
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CODE = ("model", "checks", "store", "reporting", "tasks", "flows")
# (module, attributes, label): what a child times, the first of the attributes that revision has; patched before
# the stages import them
PARTS = [
    ("model.decoding.sampling", ("sample_groups", "sample_continuations"), "sampling (every call)"),
    ("model.memory.wake", ("completion_logprobs",), "log-probabilities, one pair a sequence"),
    ("model.memory.wake", ("grouped_logprobs",), "log-probabilities, a prompt's continuations behind it"),
    ("model.sleep.rewards", ("imitation_reward",), "imitation rewards"),
    ("model.sleep.rehearsal", ("dream_task_inputs",), "rehearsal dreams"),
    ("model.sleep.held_out", ("held_out_check",), "promotion check (before + after)"),
    ("model.sleep.dreaming", ("dream_about",), "dreams and their trials"),
    ("model.sleep.dreaming", ("promote",), "training on promoted dreams"),
    ("model.sleep.consolidation", ("held_prefix",), "distillation prefix from the prompts' kept trunk"),
]


# ----------------------------------------------------------------------------- child: one side, one repeat
def child(root: Path, period: int, work: Path) -> dict:
    import importlib

    import torch

    seconds: dict[str, float] = collections.defaultdict(float)
    calls: collections.Counter = collections.Counter()

    def timed(label, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                seconds[label] += time.perf_counter() - t
                calls[label] += 1
        return wrapper

    for module, attrs, label in PARTS:
        mod = importlib.import_module(module)
        attr = next((a for a in attrs if hasattr(mod, a)), None)
        if attr is not None:
            setattr(mod, attr, timed(label, getattr(mod, attr)))
    from model.sleep.consolidation import SplitForward

    for name in ("prefix", "completion_logits"):
        setattr(SplitForward, name, timed(f"distillation {name}", getattr(SplitForward, name)))
    torch.Tensor.backward = timed("backward", torch.Tensor.backward)

    # the run's inputs to a sleep: params, the prepared stream, the wake's state and the sleep before it
    for rel in ("params.yaml", "data/processed", f"state/wake/period-{period}", f"state/sleep/period-{period - 1}"):
        src, dst = root / rel, work / rel
        if src.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)
    os.chdir(work)
    from flows.stage import run_here  # the stages as lm-sleep run starts them (flows -> tasks -> model)

    out = {}
    for stage in ("consolidate", "dream"):
        code = run_here("sleep", ["--params", "params.yaml", "--period", str(period), "--stage", stage])
        if code != 0:
            raise RuntimeError(f"sleep --stage {stage} exited {code}")
    timings = work / "metrics/timings"
    consolidation = sum(c["seconds"] for c in json.loads((timings / f"consolidation-period-{period}.json").read_text())
                        ["consolidations"])
    dreaming = json.loads((timings / f"dreaming-period-{period}.json").read_text())["seconds"]
    funnel = json.loads((work / f"metrics/dreaming/period-{period}.json").read_text()).get("funnel") \
        if (work / f"metrics/dreaming/period-{period}.json").exists() else None
    out.update({"consolidation_s": round(consolidation, 2), "dream_stage_s": round(dreaming, 2),
                "sleep_s": round(consolidation + dreaming, 2),
                "parts": {k: {"seconds": round(v, 2), "calls": calls[k]}
                          for k, v in sorted(seconds.items(), key=lambda x: -x[1])},
                "funnel": funnel,
                "child_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)})
    return out


# ----------------------------------------------------------------------------- parent
def code_of(rev: str, dest: Path) -> None:
    """The pipeline's code at ``rev`` into ``dest``."""
    tar = subprocess.run(["git", "archive", "--format=tar", rev, *CODE], cwd=ROOT, check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        t.extractall(dest, filter="data")


def run_side(code: Path, root: Path, period: int, scratch: Path) -> dict:
    work = Path(tempfile.mkdtemp(dir=scratch))
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
           "PREFECT_HOME": str(work / ".prefect-home")}  # its own API database: no cached task from another run
    for key in ("PREFECT_API_URL", "LM_SLEEP_STAGE_SERVER", "LM_SLEEP_JOB"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, __file__, "--child", "--root", str(root), "--period", str(period),
                           "--work", str(work)], env=env, cwd=code, capture_output=True, text=True)
    result = work / "bench-result.json"
    try:
        if proc.returncode != 0 or not result.exists():
            raise RuntimeError(f"the child failed ({code}, exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        return json.loads(result.read_text())
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=ROOT, help="a project after lm-sleep run (its state/ is read only)")
    ap.add_argument("--period", type=int, default=2)
    ap.add_argument("--baseline", default="HEAD", help="git revision to compare against")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/sleep_stages.json")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    root = args.root.resolve()
    if args.child:
        res = child(root, args.period, args.work)
        (args.work / "bench-result.json").write_text(json.dumps(res))
        return 0
    for rel in (f"state/wake/period-{args.period}", "params.yaml"):
        if not (root / rel).exists():
            ap.error(f"{root / rel} is missing: --root must be a project after lm-sleep run (make run) with period "
                     f"{args.period}")
    sys.path.insert(0, str(ROOT))
    from bench.results import save_results

    with tempfile.TemporaryDirectory(prefix="sleep-stages-") as tmp:
        scratch = Path(tmp)
        base = scratch / "baseline"
        base.mkdir()
        code_of(args.baseline, base)
        sides = {"baseline": base, "this tree": ROOT}
        runs: dict[str, list[dict]] = {name: [] for name in sides}
        for r in range(args.repeats):
            for name, code in sides.items():
                res = run_side(code, root, args.period, scratch)
                runs[name].append(res)
                print(f"repeat {r + 1}/{args.repeats} {name}: consolidation {res['consolidation_s']:.1f} s, dream "
                      f"stage {res['dream_stage_s']:.1f} s, sleep {res['sleep_s']:.1f} s", flush=True)
    med = {name: {k: statistics.median(r[k] for r in rs) for k in ("consolidation_s", "dream_stage_s", "sleep_s")}
           for name, rs in runs.items()}
    ratio = {k: round(med["this tree"][k] / med["baseline"][k], 3) for k in med["baseline"]}
    rev = subprocess.run(["git", "rev-parse", "--short", args.baseline], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    print(f"\nperiod {args.period}, medians of {args.repeats}: baseline {rev} / this tree (peak RSS of a side's process: "
          f"{max(r['child_peak_rss_mib'] for r in runs['baseline'])} / {max(r['child_peak_rss_mib'] for r in runs['this tree'])} MiB)")
    for k in ("consolidation_s", "dream_stage_s", "sleep_s"):
        print(f"  {k:16s} {med['baseline'][k]:7.1f} {med['this tree'][k]:7.1f}  x{ratio[k]:.2f}")
    for name, rs in runs.items():
        print(f"\n{name}, repeat 1, where the time went:")
        for label, v in rs[0]["parts"].items():
            print(f"  {label:48s} {v['seconds']:7.2f} s  {v['calls']:4d} calls")
    save_results({"root": str(root), "period": args.period, "baseline": rev, "repeats": args.repeats,
                  "medians": med, "ratio_this_tree_to_baseline": ratio, "runs": runs}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
