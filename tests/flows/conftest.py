"""A real Prefect server on 127.0.0.1 for a test module, and helpers for tests that run flows as subprocesses.

Every Prefect subprocess of a module talks to the module's server (``PREFECT_API_URL``), so
none of them pays for starting an ephemeral API of its own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prefect.events.worker import EventsWorker
from prefect.logging.handlers import APILogWorker
from prefect.settings import PREFECT_API_URL, temporary_settings

from tasks.prefect_db import seed_database
from tests.flows.helpers import free_port, stop, wait_for


@pytest.fixture(scope="module")
def prefect_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("prefect-home")


@pytest.fixture(scope="module")
def server_env(prefect_home) -> dict[str, str]:
    """Environment of the server and of every Prefect subprocess: a temporary PREFECT_HOME and database."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return env | {
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_HOME": str(prefect_home),
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{prefect_home / 'prefect.db'}",
        "PREFECT_SERVER_UI_ENABLED": "false",
    }


@pytest.fixture(scope="module")
def prefect_server(server_env, prefect_home) -> Iterator[str]:
    """``prefect server start`` on 127.0.0.1 and a free port; PREFECT_API_URL points at it for this module only.

    temporary_settings nests inside (and restores) whatever the session had, such as
    the ``prefect_harness`` test server, and the test process's environment is not touched.
    """
    port = free_port()
    log = prefect_home / "server.log"
    seed_database(server_env)  # tasks/prefect_db.py: the migrated template, not 7-30 s of migrations
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=server_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}/api"

    def healthy() -> bool:
        assert proc.poll() is None, f"prefect server exited ({proc.returncode}):\n{log.read_text()[-3000:]}"
        try:
            return httpx.get(f"{url}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(healthy, 60, "prefect server /api/health", log)
        with temporary_settings(updates={PREFECT_API_URL: url}):
            # Prefect keeps one events worker per process, whatever the API URL: one that an earlier module
            # started (its own server, or the session's test harness) would send this module's task runs there.
            # Drained, it goes; the next flow starts one for this server.
            APILogWorker.drain_all(timeout=10, at_exit=False)
            EventsWorker.drain_all(timeout=10, at_exit=False)
            yield url
            # Send what flows run in this process queued (logs, events) while the server still answers.
            APILogWorker.drain_all(timeout=10, at_exit=False)
            EventsWorker.drain_all(timeout=10, at_exit=False)
    finally:
        stop(proc, signal.SIGTERM)
