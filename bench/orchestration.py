"""What orchestration costs ``lm-sleep run`` when the work is small: this checkout against a baseline revision.

``make run``'s own figure (``metrics/timings/orchestration.json``: the job's wall time minus the time inside its
Prefect task runs) mixes the fixed costs with ten minutes of model work. Here the same job runs on the toy project
of the tests (tiny model, 2 cycles, 11 DVC stages), where nearly all of it is the fixed part: the Prefect server's and
the stage server's start, each stage's client, fork, checks and flow run, and DVC between the stages. Each side is
its own git + DVC repository holding one revision's code (``--baseline``, default ``HEAD``, from ``git archive``; and
this working tree), run one after the other, ``--repeats`` times, each time in a fresh directory (nothing cached).

    python bench/orchestration.py --baseline HEAD --repeats 2 --out bench/results/orchestration.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results import save_results  # noqa: E402
from tests.flows.test_dvc import make_project  # noqa: E402  (the test suite's toy project under git and DVC)

CODE = ("model", "checks", "store", "reporting", "tasks", "flows", "dvc.yaml")


def code_of(rev: str, dest: Path) -> None:
    """The pipeline's code at ``rev`` into ``dest``, in place of what is there."""
    for name in CODE:
        if (dest / name).is_dir():
            shutil.rmtree(dest / name)
        else:
            (dest / name).unlink(missing_ok=True)
    tar = subprocess.run(["git", "archive", "--format=tar", rev, *CODE], cwd=ROOT, check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        t.extractall(dest, filter="data")


def project(dest: Path, rev: str | None) -> Path:
    """The tests' git + DVC toy project (this working tree's pipeline, committed), with ``rev``'s code in place of
    this tree's when ``rev`` is given (DVC runs what is on disk)."""
    dest.mkdir(parents=True)
    make_project(dest)
    if rev is not None:
        code_of(rev, dest)
    return dest


def run_job(root: Path, home: Path) -> dict:
    """``lm-sleep run`` in ``root`` (its own Prefect server and PREFECT_HOME, so only its runs count)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LM_SLEEP_", "PREFECT_API_URL"))}
    env |= {"PREFECT_HOME": str(home), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
            "PREFECT_LOGGING_LEVEL": "WARNING", "DVC_NO_ANALYTICS": "1"}
    done = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--params", "params.yaml"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"lm-sleep run failed in {root}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads((root / "metrics/timings/orchestration.json").read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", default="HEAD", help="the git revision to compare this working tree with")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench/results/orchestration.json"))
    args = ap.parse_args(argv)
    base = subprocess.run(["git", "rev-parse", "--short", args.baseline], cwd=ROOT, check=True, capture_output=True,
                          text=True).stdout.strip()
    sides = {f"baseline {base}": base, "this working tree": None}
    runs: dict[str, list[dict]] = {name: [] for name in sides}
    with tempfile.TemporaryDirectory(prefix="lm-sleep-orch-") as tmp:
        for r in range(args.repeats):
            for i, (name, rev) in enumerate(sides.items()):
                root = project(Path(tmp) / f"{r}-{i}", rev)
                t = run_job(root, Path(tmp) / f"home-{r}-{i}")
                runs[name].append(t)
                print(f"{name} #{r}: total {t['total_s']} s, tasks {t['task_s']} s, orchestration {t['orchestration_s']} "
                      f"s (servers {t['servers_start_s']} s)", flush=True)
    med = lambda name, key: round(statistics.median(t[key] for t in runs[name]), 2)  # noqa: E731
    summary = {name: {k: med(name, k) for k in ("total_s", "task_s", "orchestration_s", "servers_start_s")}
               for name in sides}
    (b, n) = summary.values()
    ratio = round(n["orchestration_s"] / b["orchestration_s"], 3) if b["orchestration_s"] else None
    res = {"baseline": base, "repeats": args.repeats, "stages": 11, "cpus": os.cpu_count(), "runs": runs,
           "median": summary, "orchestration_ratio": ratio}
    save_results(res, args.out)
    print(json.dumps({"median": summary, "orchestration_ratio": ratio}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
