"""Run one pipeline stage (the command of each DVC stage): ``python -m flows.stage NAME [args]``.

Every stage process would import torch, transformers, Prefect and Great Expectations
(5-10 s here) before doing any work; a dozen stages make that a tenth of the main job.
``lm-sleep run`` therefore starts a *stage server*: one process that has imported all of
it once and, for each stage, forks a child that runs the stage. This module is the
light client DVC runs: it imports only the standard library, hands its argv, working
directory, environment and its stdin/stdout/stderr to the server over a Unix socket,
and exits with the stage's exit code. If the client is killed, the stage is killed.

Without a server (``LM_SLEEP_STAGE_SERVER`` unset or not answering: a plain ``dvc repro``)
the stage runs in this process, exactly as ``python -m flows.NAME`` would.
"""

from __future__ import annotations

import array
import contextlib
import gc
import importlib
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

STAGES = ("prepare", "wake", "sleep", "evaluate", "report", "publish", "intake")
ENV = "LM_SLEEP_STAGE_SERVER"
PRELOAD = ("torch", "transformers", "pandas", "prefect", "great_expectations",
           *(f"flows.{s}" for s in STAGES))
#: What a stage's first flow call, first parquet read and first tasks import lazily (Prefect's run engines and
#: flow graph, the encoder that serialises a flow's parameters, pandas' parquet reader, arrow types and CSV writer,
#: torch's profiler hooks, the plots' backend): imported in the server too, or every forked stage imports them
#: again, 0.1-0.2 s a stage (a test holds the stages to importing none of these packages' modules). Internal
#: modules of pinned versions: one that a later version drops is skipped, at the cost of that import in each stage.
PRELOAD_LAZY = ("prefect.flow_engine", "prefect.task_engine", "prefect.utilities.visualization", "fastapi.encoders",
                "pyarrow.parquet", "pyarrow.dataset", "pandas.core.arrays.arrow.extension_types",
                "pandas.core.methods.to_dict", "pandas.io.formats.csvs", "torch.profiler._cupti_monitor",
                "matplotlib.backends.backend_agg")


#: The tag of every flow and task run of one main job (``lm-sleep run`` sets it for the stages it starts), so the
#: job's task time counts its own runs only: other processes may write runs into the same Prefect database
#: meanwhile (``prefect server start`` keeps one in PREFECT_HOME).
JOB_ENV = "LM_SLEEP_JOB"


def job_tag(job: str) -> str:
    return f"lm-sleep-job:{job}"


def tag_job_run(flow, flow_run, state) -> None:  # noqa: ANN001 -- Prefect's flow-hook signature
    """``on_running`` hook of every pipeline flow: under ``lm-sleep run`` (``LM_SLEEP_JOB`` set), tag this flow run,
    and only it, with the job's tag.

    The job's task runs are counted through their flow runs (``flows.cli._task_seconds``) and carry no tag: Prefect
    gives every task run with a tag a concurrency-slot round trip before it runs, which waited ~2 s after any task
    of 12 s or more (bench/orchestration.py; 7 s of a 547 s main job). ``prefect.tags`` would tag both.
    """
    job = os.environ.get(JOB_ENV)
    if job is None or job_tag(job) in (flow_run.tags or []):
        return
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.update_flow_run(flow_run.id, tags=[*(flow_run.tags or []), job_tag(job)])


def run_here(name: str, argv: list[str]) -> int:
    """Run stage ``name`` in this process (its module's ``main``)."""
    if name not in STAGES:
        print(f"flows.stage: unknown stage {name!r} (one of {', '.join(STAGES)})", file=sys.stderr)
        return 2
    main = importlib.import_module(f"flows.{name}").main
    return int(main(argv) or 0)  # under `lm-sleep run`, its flows tag their runs with the job (tag_job_run)


# ------------------------------------------------------------------ client


def run_via_server(path: str, name: str, argv: list[str]) -> int | None:
    """Ask the stage server at ``path`` to run the stage; None if no server answers."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        return None
    with sock:
        request = json.dumps({"name": name, "argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
        socket.send_fds(sock, [len(request).to_bytes(8, "big") + request], [0, 1, 2])
        reply = b""
        while chunk := sock.recv(64):
            reply += chunk
    try:
        return int(json.loads(reply)["exit"])
    except (ValueError, KeyError):
        print("flows.stage: the stage server closed the connection without an exit code", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(f"usage: python -m flows.stage {{{','.join(STAGES)}}} [stage args]", file=sys.stderr)
        return 2
    name, rest = argv[0], argv[1:]
    path = os.environ.get(ENV)
    if path:
        code = run_via_server(path, name, rest)
        if code is not None:
            return code
    return run_here(name, rest)


# ------------------------------------------------------------------ server


def _recv_exact(conn: socket.socket, n: int, fds: list[int]) -> bytes:
    data = b""
    while len(data) < n:
        msg, anc, _, _ = conn.recvmsg(n - len(data), socket.CMSG_SPACE(3 * array.array("i").itemsize))
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds += array.array("i", payload[: len(payload) - len(payload) % 4]).tolist()
        if not msg:
            raise ConnectionError("client went away")
        data += msg
    return data


def _serve_one(conn: socket.socket, server: socket.socket) -> None:
    """Read a request, fork the stage with the client's stdio, relay its exit code."""
    fds: list[int] = []
    try:
        size = int.from_bytes(_recv_exact(conn, 8, fds), "big")
        request = json.loads(_recv_exact(conn, size, fds))
    except (ConnectionError, ValueError):
        for fd in fds:
            os.close(fd)
        conn.close()
        return
    pid = os.fork()
    if pid == 0:  # the stage
        code = 1
        try:
            server.close()
            conn.close()
            for target, fd in zip((0, 1, 2), fds):
                os.dup2(fd, target)
            os.chdir(request["cwd"])
            os.environ.clear()
            os.environ.update(request["env"])
            sys.argv = [f"flows.{request['name']}", *request["argv"]]
            code = run_here(request["name"], request["argv"])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:  # noqa: BLE001 -- report like an uncaught exception would, then exit
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    for fd in fds:
        os.close(fd)

    finished = threading.Event()

    def watch_client() -> None:  # the client going away (killed) before the stage ends kills the stage
        with contextlib.suppress(OSError):
            conn.recv(1)
        if not finished.is_set():  # the child is not reaped before `finished`, so its pid is still its own
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    watcher = threading.Thread(target=watch_client, daemon=True)
    watcher.start()
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)  # wait for the stage without reaping it yet
    finished.set()
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    with contextlib.suppress(OSError):
        conn.sendall(json.dumps({"exit": code if code >= 0 else 128 - code}).encode())
        conn.shutdown(socket.SHUT_WR)
    watcher.join(timeout=30)  # the client closes after reading the code; no thread is left at the next fork
    conn.close()


def _load_model_ahead(params_path: str) -> None:
    """Load the base model that ``params_path`` names, for every stage forked after (tasks.guards.load_model_ahead)."""
    from model.config import load_project
    from tasks.guards import load_model_ahead

    try:
        load_model_ahead(*load_project(params_path))
    except Exception as e:  # noqa: BLE001 -- each stage loads (or fails to load) the model itself, with its error
        print(f"stage server: no model loaded ahead ({type(e).__name__}: {e})", file=sys.stderr, flush=True)
    from tqdm._monitor import TMonitor

    for thread in threading.enumerate():  # a loading bar's monitor: this process forks, so it keeps one thread
        if isinstance(thread, TMonitor):
            thread.exit()
            thread.tqdm_cls.monitor = None  # the class whose bar started it (tqdm.auto's, not tqdm.tqdm)


def serve(path: str, params_path: str | None = None) -> None:
    """Import everything once (and the base model that ``params_path`` names, if given), then fork a stage per
    connection (one at a time, as DVC runs them)."""
    for module in PRELOAD:
        importlib.import_module(module)
    for module in PRELOAD_LAZY:
        with contextlib.suppress(ImportError):
            importlib.import_module(module)
    if params_path is not None:
        _load_model_ahead(params_path)
    # The ~675k objects the imports made live as long as the server: out of the collector's sight, so a stage's
    # full collections (several in a long stage) scan only the stage's own objects, 3 ms instead of 0.35 s.
    gc.collect()
    gc.freeze()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(4)
    # Forking is only safe while this process has one thread. An import or the model's load may leave a short-lived
    # thread behind (a fresh-clone `make run` on a loaded machine once found two): give those a moment to end.
    deadline = time.monotonic() + 30.0
    while threading.active_count() != 1 and time.monotonic() < deadline:
        for t in threading.enumerate():
            if t is not threading.main_thread():
                t.join(timeout=max(0.0, deadline - time.monotonic()))
    if threading.active_count() != 1:
        names = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
        raise RuntimeError(f"stage server: {threading.active_count()} threads after the imports ({', '.join(names)}); "
                           "cannot fork safely")
    print("ready", flush=True)
    while True:
        conn, _ = server.accept()
        _serve_one(conn, server)


@contextlib.contextmanager
def stage_server(env: dict[str, str] | None = None, params: str | None = None) -> Iterator[str]:
    """Start ``python -m flows.stage --serve`` on a private Unix socket; yield the socket's path.

    ``env`` (default: this process's) should carry the settings every stage shares, such as
    ``PREFECT_API_URL``: the server imports Prefect once, with them. With ``params`` (a params.yaml) the server
    also loads that project's base model once, and each stage's first load of it takes that copy.
    """
    import subprocess
    import tempfile

    from flows.tether import tethered

    path = str(Path(tempfile.mkdtemp(prefix="lm-sleep-")) / "stage.sock")  # 0700 directory, short path
    # A session of its own, stopped (socket directory included) with this process even by kill -9.
    ahead = [] if params is None else ["--params", str(Path(params).resolve())]
    with tethered([sys.executable, "-m", "flows.stage", "--serve", path, *ahead], remove=[os.path.dirname(path)],
                  stdout=subprocess.PIPE, text=True, env=env, cwd=Path(__file__).resolve().parents[1]) as proc:
        line = proc.stdout.readline() if proc.stdout else ""
        if line.strip() != "ready":
            raise RuntimeError(f"stage server did not start (exit {proc.poll()})")
        yield path


if __name__ == "__main__":
    if len(sys.argv) in (3, 5) and sys.argv[1] == "--serve" and sys.argv[3:4] in ([], ["--params"]):
        serve(sys.argv[2], *sys.argv[4:])
    else:
        sys.exit(main())
