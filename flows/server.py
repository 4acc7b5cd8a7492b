"""A Prefect server on 127.0.0.1 for the duration of a command.

Without ``PREFECT_API_URL`` every Prefect process starts its own temporary API (6-11 s
here). The main job runs a dozen stage processes under DVC, so ``lm-sleep run`` starts
one real server on loopback first and points every stage at it; the runs then also
stay browsable in its UI (``prefect server start`` keeps its database in PREFECT_HOME).

Every other command that runs flows (``lm-sleep compare``, ``lr-search``, a stage on its own)
starts one too where no API is configured (:func:`command_server`): Prefect's temporary API
is stopped only by an exit that runs Python's exit handlers, so a comparison ended by SIGTERM
or ``kill -9`` left its server running (a 230 MB process on a free port, for good); this one is
tethered to the command (flows/tether.py).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import httpx

from tasks.prefect_db import seed_database
from flows.tether import tethered


#: Services of ``prefect server start`` that a job's own server has no use for: they run deployments' schedules,
#: work pools, pauses, cancellations, automations and concurrency leases, none of which a job's flows use. Off,
#: the server starts ~1 s sooner on 2 cores and leaves the job those cycles; task runs and events are still recorded
#: (the task-run recorder and event persister stay on). A setting in the environment wins.
IDLE_SERVICES = ("SCHEDULER", "LATE_RUNS", "FOREMAN", "PAUSE_EXPIRATIONS", "CANCELLATION_CLEANUP", "REPOSSESSOR",
                 "TRIGGERS", "CLEANUP_RECONCILER")


class ServerStartError(RuntimeError):
    """The local Prefect server did not become healthy; the message holds the end of its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(api_url: str, client: httpx.Client | None = None) -> bool:
    """The server at ``api_url`` answers its health route. ``client``: reuse one (a new client builds a TLS context
    and loads the CA bundle, ~30 ms of CPU, even for plain HTTP on loopback)."""
    try:
        get = client.get if client is not None else httpx.get
        return get(f"{api_url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def warm(api_url: str) -> None:
    """Ask the server once for its version, in the background. Every Prefect client process checks the API version
    on its first request (each forked stage does), and the server's first answer on that route takes ~0.3 s (later
    ones ~5 ms): asked now, while the job starts DVC, no stage waits for it."""
    def ask() -> None:
        with contextlib.suppress(httpx.HTTPError):
            httpx.get(f"{api_url}/admin/version", timeout=10)
    threading.Thread(target=ask, name="prefect-server-warm", daemon=True).start()


@contextlib.contextmanager
def local_server(log_path: Path, timeout: float = 90.0,
                 while_starting: Callable[[str], None] | None = None,
                 remove: Sequence[Path] = ()) -> Iterator[str]:
    """Start ``prefect server start`` on 127.0.0.1 and a free port; yield its API URL; stop it after.

    The server runs for one job: the services in :data:`IDLE_SERVICES` are off unless the environment sets them.

    If ``PREFECT_API_URL`` is already set (a server the user runs), that one is used as is.
    ``while_starting(url)`` is called once the server's process runs and before it answers: work that needs
    the URL but not the API (such as starting the stage server, which imports everything for 5-7 s) then
    overlaps the server's own start (3-8 s) instead of following it. ``remove``: directories deleted once the
    server has stopped (by its tether, so after a ``kill -9`` of this process too).
    """
    if os.environ.get("PREFECT_API_URL"):
        if while_starting is not None:
            while_starting(os.environ["PREFECT_API_URL"])
        yield os.environ["PREFECT_API_URL"]
        return
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**{f"PREFECT_SERVER_SERVICES_{s}_ENABLED": "false" for s in IDLE_SERVICES}, **os.environ,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
           "PREFECT_UI_ENABLED": os.environ.get("PREFECT_UI_ENABLED", "false")}
    seed_database(env)  # a new database from the migrated template: no migrations in the server's start
    with open(log_path, "w") as log, tethered(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, env=env, remove=remove,
    ) as proc:  # a session of its own, stopped with this process even by kill -9 (flows/tether.py)
        deadline = time.monotonic() + timeout
        if while_starting is not None:
            while_starting(url)
        with httpx.Client() as client:
            while not healthy(url, client):
                if proc.poll() is not None or time.monotonic() > deadline:
                    tail = log_path.read_text(errors="replace")[-2000:]
                    raise ServerStartError(
                        f"prefect server on 127.0.0.1:{port} did not start (log {log_path}):\n{tail}")
                time.sleep(0.05)
        warm(url)
        try:
            yield url
        finally:
            _send_queued_logs()


def _send_queued_logs(timeout: float = 5.0) -> None:
    """Send the run logs this process still holds for the API before the server stops: Prefect sends them in
    batches from a worker thread, and one left for exit finds the server gone ("Error logging to API")."""
    if "prefect.logging.handlers" not in sys.modules:  # nothing of Prefect's logging ran here
        return
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=timeout)


@contextlib.contextmanager
def command_server(name: str) -> Iterator[str]:
    """The Prefect API for one command that runs flows (``name``: for the log's file name); yields its URL.

    A configured API (``PREFECT_API_URL`` in the environment, the Prefect profile, or a caller's temporary
    settings) is used as is. Else a :func:`local_server` for this command and every process it starts (Dask
    workers read ``PREFECT_API_URL`` from the environment), tethered to it, instead of Prefect's temporary API,
    which outlives a command ended by SIGTERM or ``kill -9``. Its log is in a temporary directory that goes
    with the server; a server that does not start raises :class:`ServerStartError` with the log's end.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    configured = PREFECT_API_URL.value()
    if configured:
        yield configured
        return
    logs = Path(tempfile.mkdtemp(prefix=f"lm-sleep-{name}-prefect-"))
    saved = os.environ.get("PREFECT_API_URL")
    try:
        with local_server(logs / "server.log", remove=[logs]) as url, temporary_settings(updates={PREFECT_API_URL: url}):
            os.environ["PREFECT_API_URL"] = url
            yield url
    finally:
        if saved is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = saved
