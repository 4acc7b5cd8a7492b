"""Faults on the toy project: kill -9 mid-cycle then rerun, two runs on one state, a failed sleep, the cache.

Every lifecycle here is a real ``python -m flows.lifecycle`` process talking to one Prefect
server for the module; each project has its own PREFECT_HOME and result storage, so no
cache leaks from one project into another. The reference is an uninterrupted run of the
same prepared project; a run killed at any point and rerun must end in the same files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import yaml
from prefect import get_client
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterParentFlowRunId,
    TaskRunFilter,
    TaskRunFilterFlowRunId,
)
from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

from model.memory.checkpoint import read_manifest
from tasks.caching import outputs_intact, state_digest
from tests.flows.helpers import wait_for
from tests.flows.test_lifecycle_flow import toy_project

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TIMING_FIELDS = {"seconds", "train_seconds", "tokens_per_second", "rehearsal_dream_seconds"}  # wall clock: differ between runs
HEAVY_TASKS = {"train_wake_period": "wake", "consolidate_due_levels": "consolidate", "dream_and_promote": "dream"}


# ---------------------------------------------------------------------------- projects and runs


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, prefect_server) -> Path:
    """The toy project after ``prepare`` (run once, in this process): tests work on copies of it."""
    from flows.prepare import prepare

    root = tmp_path_factory.mktemp("prepared")
    params = toy_project(root)
    edit_params(params, "consolidation", steps=10)
    edit_params(params, "lifecycle", publish=False)  # uploads killed mid-way: tests/store/test_store.py
    prepare(str(params))
    return root


def copy_project(prepared: Path, dest: Path) -> Path:
    """A fresh copy of the prepared project; returns its params file."""
    shutil.copytree(prepared, dest)
    return dest / "params.yaml"


def project_env(server_env: dict[str, str], api_url: str, params: Path) -> dict[str, str]:
    """The environment of a project's Prefect processes: the module's server, a PREFECT_HOME and
    result storage of the project's own (beside it, so the project holds only its own files).

    Task-run debug logs name each task as it starts ("Executing task 'dream_and_promote' ..."):
    the signals the kill tests wait for.
    """
    home = params.parent.with_name(params.parent.name + "-prefect")
    return server_env | {
        "PREFECT_API_URL": api_url,
        "PREFECT_HOME": str(home),
        "PREFECT_LOCAL_STORAGE_PATH": str(home / "storage"),
        "PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL": "DEBUG",
        "PREFECT_LOGGING_TO_API_ENABLED": "false",  # states and events still go to the server
        "OMP_WAIT_POLICY": "PASSIVE",
    }


def lifecycle_cmd(params: Path) -> list[str]:
    return [sys.executable, "-m", "flows.lifecycle", "--params", str(params)]


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """Start ``cmd`` in its own process group (so kill -9 reaches every process it made), output to ``log``."""
    with log.open("w") as out:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def run_to_end(cmd: list[str], env: dict[str, str], log: Path, timeout: float = 240) -> None:
    proc = start(cmd, env, log)
    try:
        rc = proc.wait(timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert rc == 0, f"{' '.join(cmd[1:])} exited {rc}:\n{log.read_text(errors='replace')[-4000:]}"


def kill9(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


# ---------------------------------------------------------------------------- what a run leaves


def without_timings(obj):
    """``obj`` with every wall-clock field (``TIMING_FIELDS``) removed, recursively."""
    if isinstance(obj, dict):
        return {k: without_timings(v) for k, v in obj.items() if k not in TIMING_FIELDS}
    if isinstance(obj, list):
        return [without_timings(v) for v in obj]
    return obj


def final_state(root: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every state file, dream table and metrics file (JSON without timings)."""
    out = {}
    for pattern in ("state/**/*.safetensors", "state/**/manifest.json", "dreams/**/*.parquet"):
        for p in root.glob(pattern):
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    for p in root.glob("metrics/**/*.json"):
        doc = json.dumps(without_timings(json.loads(p.read_text())), sort_keys=True)
        out[str(p.relative_to(root))] = hashlib.sha256(doc.encode()).hexdigest()
    return dict(sorted(out.items()))


def partial_files(root: Path) -> list[str]:
    """Leftovers of interrupted writes: model/io's temporaries (``.<name>.*.tmp``) and swapped-out
    directories (``.<name>.old``), and any other ``*.tmp``."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.name.endswith(".tmp") or (p.name.startswith(".") and p.name.endswith(".old")))


def heavy_task_states(params: Path) -> dict[str, list[str]]:
    """State names of the heavy tasks of the completed lifecycle run on ``params``, per ``<stage>-<period>``
    (e.g. ``{"wake-0": ["Cached"], ...}``), read from the Prefect API."""
    with get_client(sync_client=True) as client:
        runs = [r for r in client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["lifecycle"])),
                                                 limit=200)
                if r.parameters.get("params_path") == str(params) and r.state_name == "Completed"]
        assert len(runs) == 1, [(r.name, r.state_name) for r in runs]
        subflows = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[runs[0].id])), limit=200)
        period = {s.id: s.parameters["period"] for s in subflows if "period" in s.parameters}
        task_runs = client.read_task_runs(task_run_filter=TaskRunFilter(
            flow_run_id=TaskRunFilterFlowRunId(any_=list(period))), limit=200)
    out: dict[str, list[str]] = {}
    for t in sorted(task_runs, key=lambda t: t.expected_start_time or t.created):
        name = t.name.rsplit("-", 1)[0]
        if name in HEAVY_TASKS and t.flow_run_id in period:
            out.setdefault(f"{HEAVY_TASKS[name]}-{period[t.flow_run_id]}", []).append(t.state_name)
    return out


@pytest.fixture(scope="module")
def reference(prepared, tmp_path_factory, server_env, prefect_server) -> dict[str, str]:
    """The final state of an uninterrupted lifecycle on a copy of the prepared project."""
    params = copy_project(prepared, tmp_path_factory.mktemp("reference") / "project")
    run_to_end(lifecycle_cmd(params), project_env(server_env, prefect_server, params), params.parent.parent / "run.log")
    state = final_state(params.parent)
    assert partial_files(params.parent) == []
    return state


def test_the_reference_run_leaves_every_cycle(reference):
    for period in (0, 1):
        for stage in ("wake", "consolidated", "sleep"):
            assert f"state/{stage}/period-{period}/experts.safetensors" in reference
        assert f"dreams/dreaming/period-{period}-dreams.parquet" in reference
        for stage in ("wake", "consolidation", "dreaming", "lifecycle"):
            assert f"metrics/{stage}/period-{period}.json" in reference


# ---------------------------------------------------------------------------- kill -9, then rerun

# point -> (the log line a task prints when it starts, which occurrence, the period it belongs to)
KILL_POINTS = {
    "wake": ("Executing task 'train_wake_period'", 2, 1),
    "consolidation": ("Executing task 'consolidate_due_levels'", 1, 0),
    "dreaming": ("Executing task 'dream_and_promote'", 1, 0),
}
# the heavy tasks a rerun takes from the cache: everything that finished before the kill, except
# a consolidation whose sleep had not committed (a sleep is one transaction)
EXPECTED_CACHED = {
    "wake": {"wake-0", "consolidate-0", "dream-0"},
    "consolidation": {"wake-0"},
    "dreaming": {"wake-0"},
}


def stage_files(point: str, root: Path, period: int) -> tuple[Path, list[Path]]:
    """The state a stage starts from, and what it writes (its state first)."""
    return {
        "wake": (root / f"state/sleep/period-{period - 1}",  # period > 0
                 [root / f"state/wake/period-{period}", root / f"metrics/wake/period-{period}.json"]),
        "consolidation": (root / f"state/wake/period-{period}",
                          [root / f"state/consolidated/period-{period}",
                           root / f"dreams/consolidation/period-{period}.parquet"]),
        "dreaming": (root / f"state/consolidated/period-{period}",
                     [root / f"state/sleep/period-{period}", root / f"dreams/dreaming/period-{period}-dreams.parquet"]),
    }[point]


def plant_leftovers(outputs: list[Path], pid: int) -> list[Path]:
    """What kill -9 leaves when it lands inside an atomic write (too short a moment to aim at):
    the killed writer's half-written temporaries beside the stage's outputs."""
    planted = []
    for dest in outputs:
        tmp = dest.parent / f".{dest.name}.{pid}.k9k9k9k9.tmp"
        tmp.parent.mkdir(parents=True, exist_ok=True)
        if dest.suffix:
            tmp.write_bytes(b"half")
        else:
            tmp.mkdir()
            (tmp / "experts.safetensors").write_bytes(b"half")
        planted.append(tmp)
    return planted


def assert_second_run_refused(params: Path, env: dict[str, str], holder: int) -> None:
    """A second run on the same state fails at once (it does not wait: the holder is stopped and would
    never let go) with one line naming the state directory and the holder's pid."""
    second = subprocess.run([sys.executable, "-m", "flows.wake", "--period", "0", "--params", str(params)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 1, second.stderr[-3000:]
    state = params.parent.resolve() / "state"
    assert second.stderr.strip().splitlines()[-1] == (
        f"wake refused: {state}: another lifecycle run is using this state directory (pid {holder}); "
        "wait for it to finish or stop it, then run again"
    )
    assert "Traceback" not in second.stderr


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_kill_9_then_rerun_ends_like_an_uninterrupted_run(point, reference, prepared, tmp_path, server_env,
                                                          prefect_server):
    """kill -9 of the whole process group at ``point``; the same command again ends in the reference's
    files, leaves no partial file, and takes what finished before the kill from the cache. At the wake
    point a second run is refused while the first holds the state, and the rerun after the kill is
    not blocked (the OS released the lock with the killed process)."""
    params = copy_project(prepared, tmp_path / "project")
    env = project_env(server_env, prefect_server, params)
    signal_line, occurrence, period = KILL_POINTS[point]
    log = tmp_path / "killed.log"
    proc = start(lifecycle_cmd(params), env, log)
    try:
        wait_for(lambda: proc.poll() is not None or log.read_text(errors="replace").count(signal_line) >= occurrence,
                 180, f"{signal_line!r} x{occurrence}", log, interval=0.05)
        assert proc.poll() is None, f"the lifecycle ended before {point}:\n{log.read_text()[-3000:]}"
        os.killpg(proc.pid, signal.SIGSTOP)  # frozen where it is, holding the state's lock
        if point == "wake":
            assert_second_run_refused(params, env, holder=proc.pid)
    finally:
        kill9(proc)
    start_state, outputs = stage_files(point, params.parent, period)
    assert outputs_intact(start_state) and not outputs[0].exists(), f"the kill missed {point} of period {period}"
    assert all(p.exists() for p in plant_leftovers(outputs, proc.pid))

    run_to_end(lifecycle_cmd(params), env, tmp_path / "rerun.log")
    assert final_state(params.parent) == reference
    assert partial_files(params.parent) == []
    expected = {f"{stage}-{p}": ["Cached" if f"{stage}-{p}" in EXPECTED_CACHED[point] else "Completed"]
                for p in (0, 1) for stage in ("wake", "consolidate", "dream")}
    # Task runs reach the server as events, processed shortly after the run ends.
    got: dict[str, list[str]] = {}
    for _ in range(60):
        if (got := heavy_task_states(params)) == expected:
            break
        time.sleep(0.5)
    assert got == expected


# ---------------------------------------------------------------------------- the sleep transaction


@contextlib.contextmanager
def private_storage(tmp_path: Path) -> Iterator[Path]:
    """In-process flows keep their cached results under ``tmp_path`` (the module's server stays)."""
    storage = tmp_path / "prefect-storage"
    with temporary_settings(updates={PREFECT_LOCAL_STORAGE_PATH: storage}):
        yield storage


def edit_params(params: Path, section: str, **changes) -> str:
    """Change keys of one params section; returns the file's previous text."""
    before = params.read_text()
    doc = yaml.safe_load(before)
    doc.setdefault(section, {}).update(changes)
    params.write_text(yaml.safe_dump(doc))
    return before


def test_a_failed_dream_rolls_the_sleep_back_to_the_wake_state(prepared, reference, tmp_path, prefect_server,
                                                               monkeypatch):
    """A sleep whose dreaming fails, before or half-way through its writes, leaves no file of
    its own (rollback hook of the consolidation, clean-up of the failed task) and the wake's state
    as it was; the error reaches the caller. Fixed, the same sleep completes."""
    import tasks.dream
    from flows.sleep import sleep
    from flows.wake import wake

    params = copy_project(prepared, tmp_path / "project")
    root = params.parent
    wake_dir = root / "state/wake/period-0"
    sleep_outputs = [root / "state/consolidated/period-0", root / "dreams/consolidation/period-0.parquet",
                     root / "reports/dreams/period-0", root / "dreams/dreaming/period-0-dreams.parquet",
                     root / "dreams/dreaming/period-0-promoted.parquet", root / "state/sleep/period-0",
                     root / "metrics/consolidation/period-0.json", root / "metrics/dreaming/period-0.json"]

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    with private_storage(tmp_path):
        wake(0, str(params))
        wake_digest = state_digest(wake_dir)
        # Before dreaming writes anything (its tasks fail to build), once the consolidation (whose inputs
        # are unchanged) has written its state.
        def no_tasks(*args, **kwargs):
            raise ValueError("dream: the tasks could not be built")

        monkeypatch.setattr(tasks.dream, "dream_tasks", no_tasks)
        with pytest.raises(ValueError, match="dream: the tasks could not be built"):
            sleep(0, str(params))
        monkeypatch.undo()
        assert [p for p in sleep_outputs if p.exists()] == []
        assert outputs_intact(wake_dir) and state_digest(wake_dir) == wake_digest
        assert partial_files(root) == []

        # Half-way through dreaming's writes: the gate report and dream tables are out, the state is not.
        monkeypatch.setattr(tasks.dream, "save_state", disk_full)
        with pytest.raises(OSError, match="No space left on device"):
            sleep(0, str(params))
        monkeypatch.undo()
        assert [p for p in sleep_outputs if p.exists()] == []
        assert outputs_intact(wake_dir) and state_digest(wake_dir) == wake_digest
        assert partial_files(root) == []

        sleep(0, str(params))
    assert all(p.exists() for p in sleep_outputs)
    got = final_state(root)
    for key in ("state/consolidated/period-0/experts.safetensors", "state/sleep/period-0/experts.safetensors",
                "dreams/dreaming/period-0-dreams.parquet", "metrics/dreaming/period-0.json"):
        assert got[key] == reference[key], key


def task_states_of(flow_state, task: str, n: int) -> list[str]:
    """Final state names of the runs of ``task`` in one flow run, in order (waits for ``n`` of them, each
    in a final state: task runs reach the server as events, so a run can read "Pending" for a moment
    before its "Cached" or "Completed" arrives)."""
    flow_run_id = flow_state.state_details.flow_run_id

    def read() -> list[str] | None:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        runs = sorted((r for r in runs if r.name.rsplit("-", 1)[0] == task), key=lambda r: r.expected_start_time)
        final = len(runs) == n and all(r.state is not None and r.state.is_final() for r in runs)
        return [r.state_name for r in runs] if final else None

    return wait_for(read, 120, f"{n} {task} runs of flow run {flow_run_id}")  # events lag on a busy machine


def test_a_read_retried_during_a_sleep_does_not_roll_it_back(prepared, tmp_path, prefect_server, monkeypatch):
    """A task that fails and is retried inside a Prefect transaction rolls the whole transaction back
    (its rollback hooks run, nothing is committed): the sleep's I/O with retries happens outside it."""
    import tasks.wake
    from flows.sleep import sleep
    from flows.wake import wake

    params = copy_project(prepared, tmp_path / "project")
    load_stream, calls = tasks.wake.load_stream, []

    def flaky_load_stream(data_dir, task=None):
        calls.append(data_dir)
        if len(calls) == 1:
            raise OSError(f"{data_dir}: stale file handle (once)")
        return load_stream(data_dir, task)

    with private_storage(tmp_path):
        wake(0, str(params))
        monkeypatch.setattr(tasks.wake, "load_stream", flaky_load_stream)
        first = sleep(0, str(params), return_state=True)
        monkeypatch.undo()
        assert first.is_completed()
        assert outputs_intact(params.parent / "state/consolidated/period-0")
        assert outputs_intact(params.parent / "state/sleep/period-0")
        again = sleep(0, str(params), return_state=True)  # the sleep committed: both stages are cached
        assert task_states_of(again, "consolidate_due_levels", 1) == ["Cached"]
        assert task_states_of(again, "dream_and_promote", 1) == ["Cached"]
    assert len(calls) == 2  # read once, retried once


# ---------------------------------------------------------------------------- the cache


def test_wake_is_cached_by_inputs_and_recomputed_when_its_state_is_gone_or_its_params_change(prepared, tmp_path,
                                                                                             prefect_server):
    """The wake task's result is cached (as JSON) by inputs and code: a second run is a cache hit with
    the same metrics; a hit whose state is gone runs again and restores the same bytes; new params
    compute anew."""
    from flows.wake import wake

    params = copy_project(prepared, tmp_path / "project")
    state = params.parent / "state/wake/period-0"
    with private_storage(tmp_path) as storage:
        first = wake(0, str(params), return_state=True)
        assert task_states_of(first, "train_wake_period", 1) == ["Completed"]
        digest = state_digest(state)
        (record,) = storage.iterdir()  # the task's result record
        assert json.loads(record.read_text())["result"]
        second = wake(0, str(params), return_state=True)
        assert task_states_of(second, "train_wake_period", 1) == ["Cached"]
        assert second.result() == first.result()

        shutil.rmtree(state)  # a cache hit whose files are gone: computed again, the same bytes
        third = wake(0, str(params), return_state=True)
        assert task_states_of(third, "train_wake_period", 2) == ["Cached", "Completed"]
        assert outputs_intact(state) and state_digest(state) == digest
        assert without_timings(third.result()) == without_timings(first.result())

        edit_params(params, "wake", epochs=5)
        fourth = wake(0, str(params), return_state=True)
        assert task_states_of(fourth, "train_wake_period", 1) == ["Completed"]
        assert fourth.result()["steps"] == 20 and state_digest(state) != digest


# ---------------------------------------------------------------- what a stage opens

_OPENED: list[str] | None = None  # while a list, every file opened in this process is appended


def _audit(event: str, args: tuple) -> None:
    if _OPENED is not None and event == "open" and isinstance(args[0], (str, os.PathLike)):
        _OPENED.append(os.path.abspath(os.fspath(args[0])))


sys.addaudithook(_audit)  # audit hooks cannot be removed: it records only while _OPENED is a list


@contextlib.contextmanager
def recording_opens() -> Iterator[list[str]]:
    global _OPENED
    _OPENED = []
    try:
        yield _OPENED
    finally:
        _OPENED = None


def test_no_later_stage_reads_an_earlier_periods_examples(prepared, tmp_path, prefect_server):
    """Wake 1 and sleep 1 open task 1's shard and the plan (label names), never the whole stream or
    task 0's rows; the sleep state they start from carries no examples of period 0."""
    from flows.sleep import sleep
    from flows.wake import wake

    params = copy_project(prepared, tmp_path / "project")
    data = (params.parent / "data/processed").resolve()
    with private_storage(tmp_path):
        wake(0, str(params))
        sleep(0, str(params))
        with recording_opens() as opened:
            wake(1, str(params))
            sleep(1, str(params))
    data_files = sorted({p for p in opened if p.startswith(str(data))})
    assert data_files == [str(data / "tasks.json"), str(data / "tasks/task-1.parquet")], data_files
    for period in (0, 1):  # the wake's examples stay in the wake state
        assert "prompt_buffer" not in read_manifest(params.parent / f"state/sleep/period-{period}")["metadata"]
    rehearsed = pd.read_parquet(params.parent / "dreams/consolidation/period-1.parquet")
    rehearsed = rehearsed[rehearsed["kind"] == "rehearsal"]
    period0 = pd.read_parquet(data / "tasks/task-0.parquet")
    assert len(rehearsed) and set(rehearsed["reference"]) == set(period0["label"])  # every label of task 0
    assert not set(period0["text"]) & set(rehearsed["text"])  # dreamed, not recalled
