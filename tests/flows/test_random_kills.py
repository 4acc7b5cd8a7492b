"""kill -9 at seeded random moments of a whole tiny-model life, rerun, and compare with a run never killed.

The life is four commands, as a user would run them: `lm-sleep run --no-dvc` (a Prefect server of its
own, then prepare and the lifecycle: wake, consolidation, dreaming, evaluation, report, publish with
its uploads to the local store), `lm-sleep ingest` of a new batch, `lm-sleep cycle` on it (the inbox's
wake, sleep and evaluation), and `lm-sleep export` of the last state.

A chain gives each command a number of kills (in proportion to its duration, at least one each). Each
attempt of a command is killed (SIGKILL to its whole process group) at a seeded random moment: a short
random delay after a task drawn from those the command starts (so every stage is aimed at), or a random
moment of its start-up (imports, model loading, the server). Then no process of it may be left (checked
by pid), and the same command runs again, to its next kill or to its end. At the end the project must
hold the files of the life never killed (byte for byte, wall-clock fields aside), no partial or temporary
file, and the inbox's batch consumed once.

CI runs ``KILLS_IN_CI`` kills (one chain); ``LM_SLEEP_KILLS=N`` (e.g. 27) runs N kills in chains of
``CHAIN`` on demand, and ``LM_SLEEP_KILL_SEED`` picks another seed list. Each kill's aim and the stage
it landed in (the last task the killed command started) are printed.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest

from model.data.intake import LEDGER_FILE, read_ledger
from tests.flows.test_faults import (copy_project, edit_params, final_state, partial_files, project_env,
                                     without_timings)
from tests.flows.test_lifecycle_flow import toy_project

pytestmark = pytest.mark.slow

KILLS_IN_CI = 5
CHAIN = 9
# the task a command started last -> the stage a kill landed in
STAGE_OF_TASK = {
    "load_dataset": "prepare", "build_class_stream": "prepare", "validate_class_stream": "prepare",
    "write_stream": "prepare", "ingest_file": "intake", "claim_period": "intake", "read_open_period": "intake",
    "stage_batches": "intake", "mark_period": "intake", "track_period": "intake", "apply_retention": "intake",
    "read_stream": "wake", "train_wake_period": "wake", "write_metrics": "wake",
    "consolidate_due_levels": "consolidation", "dream_and_promote": "dreaming", "evaluate_cycle": "evaluation",
    "summarise_cycles": "evaluation", "report_task": "report", "publish_cycle_artifacts": "publish and upload",
}


def life(root: Path) -> list[tuple[str, list[str]]]:
    """The commands of the life, in order: (name, argv). Run in the project's directory."""
    cli = [sys.executable, "-m", "flows.cli"]
    return [
        ("run", [*cli, "run", "--no-dvc", "--params", "params.yaml"]),
        ("ingest", [*cli, "ingest", "batch.csv", "--params", "params.yaml"]),
        ("cycle", [*cli, "cycle", "--params", "params.yaml"]),
        ("export", [*cli, "export", "--state", "2", "--out", "exported", "--params", "params.yaml"]),
    ]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, prefect_server) -> Path:
    """The toy project after ``prepare``, publishing to its local store, with an inbox batch to ingest."""
    from flows.prepare import prepare

    root = tmp_path_factory.mktemp("prepared")
    params = toy_project(root)
    edit_params(params, "consolidation", steps=10)
    edit_params(params, "lifecycle", publish=True)
    rows = [{"text": f"please {w} {w} later {i}", "label": lab}
            for lab, w in (("timer", "clock"), ("joke", "funny")) for i in range(12)]
    pd.DataFrame(rows).to_csv(root / "batch.csv", index=False)
    prepare(str(params))
    return root


def tree(root: Path) -> dict[str, str]:
    """What the life leaves: ``final_state`` (states, dreams, metrics), the store's objects, the export and
    the inbox (JSON without wall-clock fields), as relative path -> sha256."""
    out = {k: v for k, v in final_state(root).items() if not k.startswith("metrics/timings/")}  # wall clock
    for sub in ("artifacts", "exported", "state/inbox"):
        for p in sorted((root / sub).rglob("*")):
            if not p.is_file() or p.name == ".lock":
                continue
            data = p.read_bytes()
            if p.suffix == ".json":
                data = json.dumps(without_timings(json.loads(data)), sort_keys=True).encode()
            out[str(p.relative_to(root))] = hashlib.sha256(data).hexdigest()
    return dict(sorted(out.items()))


def family(pid: int) -> list[int]:
    """``pid`` and every process it started (its servers' sessions included), by parent links."""
    try:
        return [pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))]
    except psutil.NoSuchProcess:
        return []


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def started_tasks(text: str) -> list[str]:
    """The tasks a command's log shows starting, in order (Prefect's task-run debug lines)."""
    return [line.split("Executing task '", 1)[1].split("'", 1)[0]
            for line in text.splitlines() if "Executing task '" in line]


def last_stage(log: Path) -> str:
    """The stage of the last task the log shows starting ("before any task": imports, loading, a server)."""
    tasks = started_tasks(log.read_text(errors="replace"))
    return STAGE_OF_TASK.get(tasks[-1], tasks[-1]) if tasks else "before any task"


def command_env(name: str, env: dict[str, str]) -> dict[str, str]:
    """``run`` starts its own Prefect server (so its kills take a server down too); the others use the module's."""
    return {k: v for k, v in env.items() if k != "PREFECT_API_URL"} if name == "run" else env


def kill_budget(n_kills: int, seconds: dict[str, float]) -> dict[str, int]:
    """How many of ``n_kills`` go to each command: one each (while there are enough), the rest in proportion
    to the commands' uninterrupted durations (largest remainders)."""
    names = list(seconds)
    budget = {name: 1 if n_kills >= len(names) else 0 for name in names}
    rest, total = n_kills - sum(budget.values()), sum(seconds.values())
    shares = {name: rest * seconds[name] / total for name in names}
    for name in names:
        budget[name] += int(shares[name])
    for name in sorted(names, key=lambda n: shares[n] - int(shares[n]), reverse=True)[: n_kills - sum(budget.values())]:
        budget[name] += 1
    return budget


def stages(tasks: list[str]) -> list[str]:
    """The stages of a command's tasks (``STAGE_OF_TASK``; others go by their task name), in order of first start."""
    return list(dict.fromkeys(STAGE_OF_TASK.get(t, t) for t in tasks))


def kill_plan(rng: random.Random, chain: int, name: str, n: int, reference: dict[str, dict]) -> list[tuple[str | None, float]]:
    """The ``n`` kills of command ``name`` in chain number ``chain``: (a task, a delay of 0-1.5 s after it
    starts in the attempt) or (None, a delay after the attempt's start: imports, model loading, the server;
    one kill in five, and every kill of a command that starts no task). The stages aimed at go round a
    seeded order of the command's stages, continued from chain to chain, so the on-demand matrix covers
    every stage; within a chain they follow the command's own order (a rerun does not redo a stage that
    finished, so a kill aimed behind the last one would miss)."""
    order = stages(reference[name]["tasks"])
    if not order:
        first = reference[name]["seconds"]
        return [(None, round(rng.uniform(0.5, first), 2)) for _ in range(n)]
    cycle = random.Random(f"{name}-stages").sample(order, len(order))  # the same order in every chain
    plan, aimed = [], 0
    for _ in range(n):
        if rng.random() < 0.2:
            plan.append((-1, None, round(rng.uniform(0.5, reference[name]["first_task_s"]), 2)))
            continue
        stage = cycle[(chain * n + aimed) % len(cycle)]
        aimed += 1
        task = rng.choice([t for t in dict.fromkeys(reference[name]["tasks"]) if STAGE_OF_TASK.get(t, t) == stage])
        plan.append((order.index(stage), task, round(rng.uniform(0.0, 1.5), 2)))
    return [(task, delay) for _, task, delay in sorted(plan, key=lambda x: x[0])]


def run_life(root: Path, env: dict[str, str], seed: int, chain: int, budget: dict[str, int],
             reference: dict[str, dict], logs: Path) -> list[tuple[str, str, str]]:
    """Run the life. Each command is killed ``budget[command]`` times (``kill_plan`` says when); an attempt
    that finishes before its kill (its target task was done, or cached, by then) ends the command's kills: a
    miss. After each kill, no process of the attempt may be left. Returns (command, target, stage) per kill
    that landed."""
    rng = random.Random(seed)
    kills: list[tuple[str, str, str]] = []
    logs.mkdir(parents=True, exist_ok=True)
    for name, argv in life(root):
        plan = kill_plan(rng, chain, name, budget[name], reference)
        for attempt in range(budget[name] + 1):
            log = logs / f"{name}-{attempt}.log"
            target, delay = plan[attempt] if attempt < budget[name] else (None, 600.0)
            with log.open("w") as out:
                proc = subprocess.Popen(argv, cwd=root, env=command_env(name, env), stdout=out,
                                        stderr=subprocess.STDOUT, start_new_session=True)
            seen: set[int] = set()
            start = time.monotonic()
            fire = None if target else start + delay
            while proc.poll() is None and (fire is None or time.monotonic() < fire):
                seen.update(family(proc.pid))
                if fire is None and target in started_tasks(log.read_text(errors="replace")):
                    fire = time.monotonic() + delay
                assert time.monotonic() - start < 600, f"{name} did not finish in 600 s:\n{log.read_text()[-4000:]}"
                time.sleep(0.05)
            if proc.poll() is not None:
                assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{log.read_text()[-4000:]}"
                break
            seen.update(family(proc.pid))
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            kills.append((name, f"{target or 'start'} +{delay:.1f} s", last_stage(log)))
            wait = time.monotonic() + 30
            while any(alive(p) for p in seen) and time.monotonic() < wait:
                time.sleep(0.1)
            left = [(p, psutil.Process(p).cmdline()[:4]) for p in seen if alive(p)]
            assert left == [], f"kill {len(kills)} ({name}) left processes: {left}"
    return kills


@pytest.fixture(scope="module")
def reference(prepared, tmp_path_factory, server_env, prefect_server) -> tuple[dict[str, str], dict[str, dict], Path]:
    """The files of the life never killed; per command: its duration, the tasks it started and when the
    first one started (what the kills aim at); and a copy of the project as its `run` left it."""
    root = copy_project(prepared, tmp_path_factory.mktemp("reference") / "project").parent
    env = project_env(server_env, prefect_server, root / "params.yaml")
    commands: dict[str, dict] = {}
    for name, argv in life(root):
        t0, first = time.monotonic(), None
        log = root.parent / f"{name}.log"
        with log.open("w") as out:
            proc = subprocess.Popen(argv, cwd=root, env=command_env(name, env), stdout=out, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            if first is None and started_tasks(log.read_text(errors="replace")):
                first = time.monotonic() - t0
            assert time.monotonic() - t0 < 600, f"{name} did not finish in 600 s"
            time.sleep(0.05)
        text = log.read_text(errors="replace")
        assert proc.returncode == 0, f"{name}: {text[-4000:]}"
        commands[name] = {"seconds": time.monotonic() - t0, "tasks": started_tasks(text), "first_task_s": first}
        if name == "run":  # every flow ran against the run's own server: no temporary API of Prefect's beside it
            assert "temporary server" not in text
            timings = json.loads((root / "metrics/timings/orchestration.json").read_text())
            assert timings["mode"] == "lifecycle flow" and timings["task_runs"] > 20, timings
            # a finished run, with its cache (project_env's PREFECT_HOME beside it), for the outage test
            shutil.copytree(root, root.parent / "after-run", symlinks=True)
            shutil.copytree(root.with_name(root.name + "-prefect"), root.parent / "after-run-prefect", symlinks=True)
    assert partial_files(root) == []
    return tree(root), commands, root.parent / "after-run"


def chains() -> list[tuple[int, int]]:
    """(seed, kills) per chain: ``KILLS_IN_CI`` in one chain, or ``LM_SLEEP_KILLS`` in chains of ``CHAIN``."""
    total = int(os.environ.get("LM_SLEEP_KILLS", KILLS_IN_CI))
    seed = int(os.environ.get("LM_SLEEP_KILL_SEED", 0))
    sizes = [CHAIN] * (total // CHAIN) + ([total % CHAIN] if total % CHAIN else [])
    return [(seed + i, k) for i, k in enumerate(sizes)]


@pytest.mark.parametrize("seed,n_kills", chains())
def test_killed_at_random_moments_the_life_ends_like_one_never_killed(seed, n_kills, reference, prepared, tmp_path,
                                                                      server_env, prefect_server):
    files, commands, _ = reference
    root = copy_project(prepared, tmp_path / "project").parent
    env = project_env(server_env, prefect_server, root / "params.yaml")
    budget = kill_budget(n_kills, {name: c["seconds"] for name, c in commands.items()})
    chain = [c[0] for c in chains()].index(seed)
    kills = run_life(root, env, seed, chain, budget, commands, tmp_path / "logs")
    print(f"seed {seed}: {len(kills)} of {n_kills} kills landed (budget {budget}): "
          + ", ".join(f"{c} at {t} -> {s}" for c, t, s in kills))
    assert kills, "no kill landed: every command finished before its first delay"
    got = tree(root)
    assert got.keys() == files.keys()
    assert [k for k in files if got[k] != files[k]] == []
    assert partial_files(root) == []
    ledger = read_ledger(root / "state/inbox" / LEDGER_FILE)
    assert len(ledger.batches) == 1 and [p["status"] for p in ledger.periods] == ["done"]


def test_a_finished_run_rerun_with_the_store_down_exits_1_and_changes_nothing(reference, server_env, prefect_server):
    """`lm-sleep run --no-dvc` again on a finished run (the reference's copy after its `run`), with a store
    that does not answer (S3 on a closed port): every cycle is cached, publishing cannot finish, and the run
    exits 1 with the store's error as its last line (a scheduler sees it), having changed none of the run's
    files (the uploads wait in the outbox)."""
    root = reference[2]
    files = tree(root)
    env = project_env(server_env, prefect_server, root / "params.yaml")
    store = {"LM_SLEEP_S3_BUCKET": "lm-sleep-test", "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9",
             "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    done = subprocess.run(life(root)[0][1], cwd=root, env=command_env("run", env) | store, capture_output=True,
                          text=True, timeout=600)
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 1 and last.startswith("publish incomplete: ") and "127.0.0.1:9" in last, done.stderr[-3000:]
    after = tree(root)
    assert any(k.startswith("artifacts/.outbox/blobs/") for k in after)  # what waits for the store is kept

    def kept(t: dict[str, str]) -> dict[str, str]:
        return {k: v for k, v in t.items() if not k.startswith("artifacts/.outbox/")}

    assert kept(after) == kept(files)

