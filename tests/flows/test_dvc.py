"""`dvc repro` of this checkout's dvc.yaml in a temporary git repository, on the toy project
(tiny model, 2 cycles): every stage and output, a no-op rerun, a dream parameter that reruns
only what depends on it, and a rerun from scratch that writes the same bytes.

Every stage is a Prefect flow in its own process; they all talk to one Prefect server on
127.0.0.1 (starting the ephemeral API in each process would cost 6-11 s a stage).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from flows.stage import ENV as STAGE_SERVER_ENV
from flows.stage import stage_server
from model.config import load_params
from reporting import FIGURES, PLOT_CSVS, REPORT_DIR
from tests.flows.helpers import stop
from tests.flows.test_lifecycle_flow import TRAINED_DREAMS, toy_project

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
STAGES = {"prepare", "wake@0", "consolidate@0", "dream@0", "evaluate@0",
          "wake@1", "consolidate@1", "dream@1", "evaluate@1", "report", "publish"}
REPRO_TIMEOUT_S = 900
RAN = re.compile(r"^Running stage '([^']+)':", re.M)
SKIPPED = re.compile(r"^Stage '([^']+)' didn't change, skipping", re.M)


def make_project(root: Path) -> Path:
    """A git + DVC repository holding this checkout's pipeline (code, dvc.yaml, DVC config and plot
    templates) and the toy project's params and data, committed; returns ``root``."""
    for name in ("model", "checks", "store", "reporting", "tasks", "flows"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", root)
    params_path = toy_project(root, "data/raw/toy.csv")  # data/raw: a dependency of prepare and dream
    params = yaml.safe_load(params_path.read_text())
    params["lifecycle"] = {"cycles": load_params(params_path).expected_cycles()}
    params["dream"].update(TRAINED_DREAMS)  # dream@0 changes the sleep state on every machine (a dream param reruns it)
    params_path.write_text(yaml.safe_dump(params))
    git = ["git", "-c", "user.name=lm-sleep tests", "-c", "user.email=tests@lm-sleep.invalid", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "init", "-q"], cwd=root, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True)
    shutil.copy(REPO / ".dvc/config", root / ".dvc/config")
    shutil.copytree(REPO / ".dvc/plots", root / ".dvc/plots", dirs_exist_ok=True)
    subprocess.run([*git, "add", "-A"], cwd=root, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "toy project"], cwd=root, check=True)
    return root


def dvc(root: Path, env: dict[str, str], *args: str) -> str:
    """Run ``dvc *args`` in ``root``; return its output (stdout and stderr); fail with it if dvc fails."""
    done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=REPRO_TIMEOUT_S)
    assert done.returncode == 0, f"dvc {' '.join(args)} failed:\n{done.stdout[-5000:]}"
    return done.stdout


def status(root: Path, env: dict[str, str]) -> dict:
    """``dvc status``: stage -> what changed; empty when the pipeline is up to date."""
    return json.loads(dvc(root, env, "status", "--json"))


def reproducible_files(root: Path) -> dict[str, str]:
    """SHA-256 by path of every dream table, metrics file (not the timings) and state file of a run."""
    paths = [*root.glob("dreams/**/*.parquet"), *root.glob("state/*/period-*/*"),
             *(p for p in root.glob("metrics/**/*") if p.is_file() and "timings" not in p.relative_to(root).parts)]
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(paths)}


@dataclass(frozen=True)
class Run:
    """A project after its first ``dvc repro``: its output and the digests of :func:`reproducible_files`."""

    root: Path
    output: str
    digests: dict[str, str]


@pytest.fixture(scope="module")
def dvc_env(server_env, prefect_server) -> Iterator[dict[str, str]]:
    """The environment of ``dvc repro``: this venv's python first on PATH, the module's Prefect server,
    the local store, and a stage server (as ``lm-sleep run`` starts one) so stages do not each import torch."""
    env = {k: v for k, v in server_env.items() if not k.startswith(("LM_SLEEP_", "AWS_"))}
    env |= {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        "PREFECT_API_URL": prefect_server,
        "DVC_NO_ANALYTICS": "1",
        "GX_ANALYTICS_ENABLED": "false",
        "OMP_WAIT_POLICY": "PASSIVE",
    }
    with stage_server(env) as path:
        yield env | {STAGE_SERVER_ENV: path}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, dvc_env) -> dict[str, Run]:
    """Two copies of the toy project, each reproduced from scratch: "a" (the tests then change it) and "b".

    They run side by side, which keeps two cores busy: each stage is one single-threaded process
    (wake.threads is 1) that spends most of its time importing torch, transformers and Prefect.
    """
    roots = {name: make_project(tmp_path_factory.mktemp(f"project-{name}")) for name in ("a", "b")}
    logs = {name: root.with_name(f"{root.name}-repro.log") for name, root in roots.items()}
    procs, started = {}, time.monotonic()
    for name, root in roots.items():
        with logs[name].open("w") as log:
            procs[name] = subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=root, env=dvc_env, stdout=log,
                                           stderr=subprocess.STDOUT, start_new_session=True)
    out = {}
    try:
        for name, proc in procs.items():
            proc.wait(max(1.0, REPRO_TIMEOUT_S - (time.monotonic() - started)))
            output = logs[name].read_text()
            assert proc.returncode == 0, f"dvc repro of project {name} failed:\n{output[-8000:]}"
            out[name] = Run(roots[name], output, reproducible_files(roots[name]))
    finally:
        for proc in procs.values():
            stop(proc, signal.SIGTERM)
    return out


def test_repro_runs_every_stage_and_writes_every_output(runs, dvc_env):
    run = runs["a"]
    root, ran = run.root, RAN.findall(run.output)
    assert sorted(ran) == sorted(STAGES) and ran[0] == "prepare" and ran[-1] == "publish"
    for stage in ("wake", "consolidate", "dream", "evaluate"):
        assert ran.index(f"{stage}@0") < ran.index(f"{stage}@1")
    assert ran.index("dream@0") < ran.index("wake@1")  # cycle 1 wakes from cycle 0's sleep
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert set(lock) == STAGES
    for name, stage in lock.items():
        for out in stage.get("outs", []):
            assert (root / out["path"]).exists(), f"{name}: output {out['path']} missing"
    for p in (0, 1):
        for kind in ("wake", "consolidated", "sleep"):
            assert {"manifest.json", "experts.safetensors"} <= {f.name for f in (root / f"state/{kind}/period-{p}").iterdir()}
        assert (root / f"dreams/consolidation/period-{p}.parquet").is_file()
        assert (root / f"dreams/dreaming/period-{p}-dreams.parquet").is_file()
        assert (root / f"dreams/dreaming/period-{p}-promoted.parquet").is_file()
        assert (root / f"metrics/lifecycle/period-{p}.json").is_file()
    for name in (*FIGURES.values(), "report.md"):
        assert (root / REPORT_DIR / name).is_file()
    # Wall-clock measures live apart from the metrics, which must not vary from run to run.
    wake = json.loads((root / "metrics/wake/period-0.json").read_text())
    assert wake["tokens"] > 0 and not {"train_seconds", "tokens_per_second"} & set(wake)
    assert json.loads((root / "metrics/timings/wake-period-0.json").read_text())["tokens_per_second"] > 0
    (consolidation,) = json.loads((root / "metrics/consolidation/period-0.json").read_text())["consolidations"]
    assert "seconds" not in consolidation
    timing = json.loads((root / "metrics/timings/consolidation-period-0.json").read_text())
    assert [(c["src"], c["dst"]) for c in timing["consolidations"]] == [("fast", "slow")]
    assert "seconds" in json.loads((root / "metrics/timings/dreaming-period-0.json").read_text())
    # dvc.yaml's metrics and plots render from what the run wrote.
    metrics = json.loads(dvc(root, dvc_env, "metrics", "show", "--json"))[""]["data"]
    assert metrics["metrics/lifecycle.json"]["data"]["periods"] == 2
    assert "forgetting" in metrics["metrics/continual_learning.json"]["data"]
    plots = json.loads(dvc(root, dvc_env, "plots", "show", "--json"))["data"]
    assert len(plots) == len(PLOT_CSVS)
    for title, rendered in plots.items():
        assert [r["type"] for r in rendered] == ["vega"] and rendered[0]["content"]["data"]["values"], title


def test_a_second_repro_runs_nothing_within_10_s(runs, dvc_env):
    root = runs["a"].root
    start = time.monotonic()
    output = dvc(root, dvc_env, "repro")
    seconds = time.monotonic() - start
    assert RAN.findall(output) == []
    assert set(SKIPPED.findall(output)) == STAGES
    assert seconds < 10, f"a no-op dvc repro took {seconds:.1f} s"
    assert status(root, dvc_env) == {}


def test_a_dream_parameter_reruns_the_dreams_and_what_depends_on_them(runs, dvc_env):
    """Changing ``dream.lr`` (ReST-EM and promotion) makes only the dream stages stale: they are the
    only ones that read ``dream`` params. dream@0 then writes a different sleep state for cycle 0, so
    every stage that consumes it, directly or not, must rerun: evaluate@0, wake@1 (cycle 1 wakes from
    that state), consolidate@1, dream@1 (stale anyway), evaluate@1, report and publish. prepare,
    wake@0 and consolidate@0 read neither dream params nor anything dream@0 writes: they must not
    rerun, and their outputs keep their bytes.
    """
    root = runs["a"].root
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["dream"]["lr"] = 2 * load_params(root / "params.yaml").dream.lr
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    assert set(status(root, dvc_env)) == {"dream@0", "dream@1"}
    before = reproducible_files(root)

    output = dvc(root, dvc_env, "repro")
    ran, skipped = RAN.findall(output), SKIPPED.findall(output)
    assert set(ran) == {"dream@0", "evaluate@0", "wake@1", "consolidate@1", "dream@1", "evaluate@1", "report",
                        "publish"}
    assert set(skipped) == {"prepare", "wake@0", "consolidate@0"} and len(ran) == len(set(ran))
    after = reproducible_files(root)
    changed = {path for path in after if before.get(path) != after[path]}
    assert "state/sleep/period-0/experts.safetensors" in changed  # what makes cycle 1 rerun
    untouched = [p for p in after if p.startswith(("state/wake/period-0/", "state/consolidated/period-0/",
                                                   "dreams/consolidation/period-0", "metrics/wake/period-0",
                                                   "metrics/consolidation/period-0"))]
    assert len(untouched) >= 8 and not changed & set(untouched)
    assert status(root, dvc_env) == {}


def test_a_rerun_from_scratch_writes_identical_dreams_metrics_and_experts(runs):
    """Project b is a fresh copy of project a with the same params and seed, reproduced from scratch."""
    a, b = runs["a"].digests, runs["b"].digests
    assert sum(p.endswith(".parquet") for p in a) == 6
    assert sum(p.endswith("experts.safetensors") for p in a) == 6
    assert sum(p.startswith("metrics/") for p in a) >= 12
    assert sorted(b) == sorted(a)
    assert [p for p in a if a[p] != b[p]] == []


def test_a_comparison_is_a_dvc_stage_of_its_own_pipeline(tmp_path, dvc_env):
    """evaluation/dvc.yaml: `dvc repro` of a comparison writes its report and metrics, a rerun skips it,
    and the lifecycle's `dvc repro` (the main job) does not run it."""
    root = make_project(tmp_path)
    (root / "evaluation").mkdir()
    shutil.copy(REPO / "evaluation/dvc.yaml", root / "evaluation")
    params_path = root / "params.yaml"
    params = yaml.safe_load(params_path.read_text())
    params["evaluation"] = {"comparisons": {"toy": {"methods": ["zero_shot", "finetune", "cms"], "seeds": [0]}}}
    params_path.write_text(yaml.safe_dump(params))
    stage = "evaluation/dvc.yaml:compare@toy"
    assert "compare" not in dvc(root, dvc_env, "stage", "list", "--name-only")  # the main job's pipeline (dvc.yaml)
    output = dvc(root, dvc_env, "repro", stage)
    assert f"Running stage '{stage}'" in output
    metrics = json.loads((root / "reports/toy/metrics.json").read_text())
    assert set(metrics["methods"]) == {"zero_shot", "finetune", "cms"}
    shown = dvc(root, dvc_env, "metrics", "show", "--json")  # other metrics of the project are missing: a warning first
    assert '"reports/toy/metrics.json": {"data": {"comparison": "toy"' in shown
    assert f"Stage '{stage}' didn't change, skipping" in dvc(root, dvc_env, "repro", stage)
