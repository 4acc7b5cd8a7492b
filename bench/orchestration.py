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

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results import save_results  # noqa: E402
from model.config import load_params  # noqa: E402
from tests.flows.test_lifecycle_flow import toy_project  # noqa: E402  (the test suite's toy project)

CODE = ("model", "checks", "store", "reporting", "tasks", "flows", "dvc.yaml")
GIT = ["git", "-c", "user.name=lm-sleep bench", "-c", "user.email=bench@lm-sleep.invalid", "-c", "commit.gpgsign=false"]


def code_of(rev: str | None, dest: Path) -> None:
    """The pipeline's code at ``rev`` (None: this working tree, uncommitted changes included) into ``dest``."""
    if rev is None:
        for name in CODE:
            src = ROOT / name
            if src.is_dir():
                shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy(src, dest / name)
        return
    tar = subprocess.run(["git", "archive", "--format=tar", rev, *CODE], cwd=ROOT, check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        t.extractall(dest, filter="data")


def project(dest: Path, rev: str | None) -> Path:
    """A git + DVC repository with ``rev``'s pipeline and the toy project's params and data, committed."""
    dest.mkdir(parents=True)
    code_of(rev, dest)
    params_path = toy_project(dest, "data/raw/toy.csv")
    params = yaml.safe_load(params_path.read_text())
    params["lifecycle"] = {"cycles": load_params(params_path).expected_cycles()}
    params_path.write_text(yaml.safe_dump(params))
    subprocess.run([*GIT, "init", "-q"], cwd=dest, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=dest, check=True)
    shutil.copy(ROOT / ".dvc/config", dest / ".dvc/config")
    shutil.copytree(ROOT / ".dvc/plots", dest / ".dvc/plots", dirs_exist_ok=True)
    subprocess.run([*GIT, "add", "-A"], cwd=dest, check=True)
    subprocess.run([*GIT, "commit", "-q", "-m", "toy project"], cwd=dest, check=True)
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
