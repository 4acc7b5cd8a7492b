"""The stage server: DVC's stage commands fork from one process that imported everything once."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from flows.server import local_server
from flows.stage import ENV, stage_server
from model.decoding.loading import tiny_model
from tests.flows.test_lifecycle_flow import toy_project

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """A Prefect server on loopback and a stage server started with it in the environment."""
    home = tmp_path_factory.mktemp("prefect-home")
    saved = dict(os.environ)
    os.environ["PREFECT_HOME"] = str(home)
    try:
        with local_server(home / "server.log") as url:
            os.environ["PREFECT_API_URL"] = url
            with stage_server() as path:
                yield path
    finally:
        os.environ.clear()
        os.environ.update(saved)


def stage(args: list[str], path: str | None, **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != ENV}
    if path:
        env[ENV] = path
    return subprocess.run([sys.executable, "-m", "flows.stage", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, **kw)


def server_pid(path: str) -> int:
    """The stage server's pid (not its tether's, whose command line ends with the server's)."""
    (proc,) = [p for p in psutil.process_iter(["cmdline"]) if (p.info["cmdline"] or [])[1:4] == ["-m", "flows.stage", "--serve"]
               and path in p.info["cmdline"]]
    return proc.pid


def test_stages_run_through_the_server_like_in_their_own_process(servers, tmp_path):
    (tmp_path / "served").mkdir()
    (tmp_path / "alone").mkdir()
    served = toy_project(tmp_path / "served")
    alone = toy_project(tmp_path / "alone")
    base = tmp_path / "base"  # a model directory: loading it shows a progress bar, whose monitor thread the
    lm = tiny_model()        # server must not keep (a process with a second thread cannot fork safely)
    lm.model.save_pretrained(base)
    lm.tokenizer.save_pretrained(base)
    for params in (served, alone):
        doc = yaml.safe_load(params.read_text())
        doc["model"] = {"source": "path", "path": str(base)}
        params.write_text(yaml.safe_dump(doc))
    # as `lm-sleep run` starts it: the server loads the project's base model once, and the stage takes that copy
    with stage_server(params=str(served)) as ahead:
        for params in (served, alone):
            path = ahead if params is served else None
            assert stage(["prepare", "--params", str(params)], path).returncode == 0
            r = stage(["wake", "--params", str(params), "--period", "0"], path)
            assert r.returncode == 0, r.stderr[-2000:]
            assert "Finished in state Completed" in r.stdout + r.stderr  # the stage's output reached the client
    # the job's server (its idle services off, flows/server.py) recorded the stages' task runs
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with get_client(sync_client=True) as client:
        deadline = time.monotonic() + 30  # task runs reach the database through events, a moment later
        while not (runs := client.read_task_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["wake"])))):
            assert time.monotonic() < deadline, "no task run of the wake flows was recorded"
            time.sleep(0.5)
    assert {r.name.rsplit("-", 1)[0] for r in runs} >= {"read_stream"}
    a = json.loads((served.parent / "metrics/wake/period-0.json").read_text())
    b = json.loads((alone.parent / "metrics/wake/period-0.json").read_text())
    assert a["losses"] == b["losses"] and a["level_updates"] == b["level_updates"]
    assert (served.parent / "state/wake/period-0/manifest.json").read_bytes() == (
        alone.parent / "state/wake/period-0/manifest.json").read_bytes()


def test_the_job_servers_idle_services_are_prefects_own_settings():
    from prefect.settings import get_current_settings

    from flows.server import IDLE_SERVICES

    services = type(get_current_settings().server.services).model_fields
    assert {s.lower() for s in IDLE_SERVICES} <= set(services)
    assert not {"task_run_recorder", "event_persister"} & {s.lower() for s in IDLE_SERVICES}


FIRST_RUN = """
import importlib, json, sys
from flows.stage import PRELOAD, PRELOAD_LAZY, run_here
for module in (*PRELOAD, *PRELOAD_LAZY):  # what the stage server imports before it forks
    importlib.import_module(module)
before = set(sys.modules)
p = ["--params", sys.argv[1]]
for argv in (["prepare", *p], ["wake", *p, "--period", "0"], ["sleep", *p, "--period", "0", "--stage", "consolidate"],
             ["sleep", *p, "--period", "0", "--stage", "dream"], ["evaluate", *p, "--period", "0"]):
    assert run_here(argv[0], argv[1:]) == 0, argv
print(json.dumps(sorted(set(sys.modules) - before)))
"""


def test_a_forked_stage_imports_nothing_the_server_could_have(servers, tmp_path):
    """The stages' first flow call, first parquet read and tasks (prepare, wake, both sleep stages, evaluate) import
    nothing from the packages the server preloads (Prefect's engines, fastapi's encoder, pyarrow's parquet reader):
    those imports came back in every forked stage, 0.1-0.2 s each."""
    params = toy_project(tmp_path)
    out = subprocess.run([sys.executable, "-c", FIRST_RUN, str(params)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env={k: v for k, v in os.environ.items() if k != ENV})
    assert out.returncode == 0, out.stderr[-3000:]
    new = json.loads(out.stdout.strip().splitlines()[-1])
    heavy = [m for m in new if m.split(".")[0] in {"prefect", "fastapi", "starlette", "pyarrow", "torch",
                                                     "transformers", "pandas", "great_expectations", "matplotlib"}]
    assert heavy == [], heavy


def test_a_failing_stage_gives_its_exit_code_and_error(servers, tmp_path):
    r = stage(["wake", "--params", str(tmp_path / "missing.yaml"), "--period", "0"], servers)
    assert r.returncode != 0 and "params file not found" in r.stderr
    r = stage(["nonsense"], servers)
    assert r.returncode == 2 and "unknown stage" in r.stderr
    # a server asked to load a model ahead from a params file it cannot read still serves; the stage says why
    with stage_server(params=str(tmp_path / "missing.yaml")) as ahead:
        r = stage(["wake", "--params", str(tmp_path / "missing.yaml"), "--period", "0"], ahead)
        assert r.returncode != 0 and "params file not found" in r.stderr


def test_killing_the_client_kills_its_stage(servers, tmp_path):
    params = toy_project(tmp_path)
    text = params.read_text().replace("epochs: 6", "epochs: 400")  # a wake long enough to kill
    params.write_text(text)
    assert stage(["prepare", "--params", str(params)], servers).returncode == 0
    env = {**os.environ, ENV: servers}
    client = subprocess.Popen([sys.executable, "-m", "flows.stage", "wake", "--params", str(params), "--period", "0"],
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    zygote = psutil.Process(server_pid(servers))
    deadline = time.monotonic() + 60
    while not zygote.children() and time.monotonic() < deadline:
        time.sleep(0.2)
    (child,) = zygote.children()
    time.sleep(1.0)
    client.send_signal(signal.SIGKILL)
    client.wait()
    child.wait(timeout=20)  # gone with its client
    assert not (tmp_path / "state/wake/period-0").exists()  # nothing half-written
    assert stage(["prepare", "--params", str(params)], servers).returncode == 0  # the server still serves


STARTER = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C, even where the parent ignores SIGINT (xdist)
from pathlib import Path
from flows.server import local_server
from flows.stage import stage_server
with local_server(Path(sys.argv[1]) / "server.log") as url, stage_server() as path:
    print(path, flush=True)
    time.sleep(600)
"""


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (a dead process its parent has not reaped)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize("how", ["kill -9 of the process group", "normal exit"])
def test_no_server_process_outlives_its_starter(how, tmp_path):
    """The Prefect server and the stage server run in sessions of their own (Ctrl-C reaches the run first),
    yet kill -9 of the starter's whole process group leaves none of their processes (checked by pid) and
    no socket directory: their tethers stop them (flows/tether.py)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", ENV)} | {"PREFECT_HOME": str(tmp_path)}
    starter = subprocess.Popen([sys.executable, "-c", STARTER, str(tmp_path)], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        socket_path = starter.stdout.readline().strip()
        assert socket_path.endswith("stage.sock") and os.path.exists(socket_path), socket_path
        family = psutil.Process(starter.pid).children(recursive=True)
        pids = [p.pid for p in family]
        sessions = {os.getsid(pid) for pid in pids}
        assert len(pids) >= 2 and len(sessions) >= 2, [(p.pid, p.cmdline()[:4]) for p in family]
        if how == "normal exit":
            starter.send_signal(signal.SIGINT)  # KeyboardInterrupt: the context managers stop the servers
            assert starter.wait(timeout=60) != 0
        else:
            os.killpg(starter.pid, signal.SIGKILL)
            starter.wait()
        deadline = time.monotonic() + 40
        while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [(pid, psutil.Process(pid).cmdline()[:5]) for pid in pids if alive(pid)]
        assert left == [], left
        assert not os.path.exists(os.path.dirname(socket_path))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(starter.pid, signal.SIGKILL)
        starter.wait()


def test_a_command_uses_the_configured_api_and_starts_no_server():
    """``command_server``: a Prefect API the user set (here in Prefect's settings, as a profile or the environment
    sets it) is used as is, nothing started."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.server import command_server

    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}), command_server("compare") as url:
        assert url == "http://127.0.0.1:9/api"
        assert {p.pid for p in psutil.Process().children(recursive=True)} == before


def cmdline(proc: psutil.Process) -> list[str]:
    """A process's command line, empty once it has gone."""
    try:
        return proc.cmdline()
    except psutil.Error:
        return []


def test_a_comparison_ended_by_sigterm_leaves_no_prefect_server(tmp_path):
    """`lm-sleep compare` with no Prefect API configured reports to a local server tethered to it
    (flows/server.py command_server): SIGTERM to the command alone, which runs no exit handler, stops the
    server's whole session and removes its log directory. Prefect's own temporary API outlived it (230 MB,
    for good)."""
    from tests.flows.test_compare import _with_comparisons

    params = _with_comparisons(toy_project(tmp_path), methods=["finetune", "sleep"], seeds=[0, 1, 2])
    env = ({k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", ENV)}
           | {"PREFECT_HOME": str(tmp_path / "home"), "PYTHONPATH": str(ROOT)})
    cmd = [sys.executable, "-m", "flows.cli", "compare", "toy", "--params", str(params)]
    command = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        deadline, server = time.monotonic() + 120, None
        while server is None and time.monotonic() < deadline and command.poll() is None:
            server = next((p for p in psutil.Process(command.pid).children(recursive=True)
                           if cmdline(p)[1:5] == ["-m", "prefect", "server", "start"]), None)
            time.sleep(0.2)
        assert server is not None, "no `prefect server start` under the command: it ran on Prefect's temporary API"
        tether = psutil.Process(server.ppid()).cmdline()  # flows/tether.py FD --grace S --remove DIR -- CMD
        logs = Path(tether[tether.index("--remove") + 1])
        assert logs.name.startswith("lm-sleep-compare-prefect-") and (logs / "server.log").is_file(), tether
        pids = [p.pid for p in psutil.Process(command.pid).children(recursive=True)]
        time.sleep(3)  # a flow run under way
        assert command.poll() is None, "the comparison ended before it could be stopped"
        command.send_signal(signal.SIGTERM)
        command.wait(timeout=30)
        deadline = time.monotonic() + 40
        while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert [(pid, psutil.Process(pid).cmdline()[:5]) for pid in pids if alive(pid)] == []
        assert not logs.exists()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(command.pid, signal.SIGKILL)
        command.wait()


LOGGING_COMMAND = """
from prefect import flow, get_run_logger
from flows.server import command_server

@flow
def talk():
    for i in range(20):
        get_run_logger().info(f"line {i}")

with command_server("logs"):
    talk()
print("done")
"""


def test_a_commands_last_run_logs_reach_its_server_before_it_stops(tmp_path):
    """The run logs a command still holds when its flow ends are sent before its tethered server stops: Prefect
    sends them in batches from a thread, and a batch left for exit met the stopped server ("Error logging to API"
    at the end of every `lm-sleep compare --report-only`)."""
    env = ({k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", ENV)}
           | {"PREFECT_HOME": str(tmp_path / "home"), "PYTHONPATH": str(ROOT)})
    r = subprocess.run([sys.executable, "-c", LOGGING_COMMAND], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "done" in r.stdout, r.stderr[-2000:]
    assert "Finished in state Completed" in r.stderr  # the flow ran and logged
    assert "Error logging to API" not in r.stderr, r.stderr[-2000:]
