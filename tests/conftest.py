"""Shared test setup: offline, no telemetry, and an opt-in Prefect test server."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

for _key, _value in {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "GX_ANALYTICS_ENABLED": "false",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}.items():
    os.environ[_key] = _value


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """A temporary Prefect server and database for the whole session (started on first use; under a loaded machine
    its start has taken 37-48 s here, so it gets 180 s, as the ephemeral servers do)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(autouse=True)
def _prefect_logs_to_an_open_stream() -> Iterator[None]:
    """Prefect's console handlers keep the sys.stderr of the moment logging was set up. When that happened under
    an earlier test's ``capsys`` (building an API app sets logging up again), the stream is closed by now and
    every log line would fail (seen with `-k` selections). Before each test, set them up again if so."""
    import logging
    import sys

    if "prefect.logging.configuration" in sys.modules:
        handlers = [h for name in (None, "prefect._internal", "uvicorn", "fastapi")
                    for h in logging.getLogger(name).handlers]
        if any(getattr(getattr(h, "stream", None), "closed", False) for h in handlers):
            from prefect.logging.configuration import setup_logging

            setup_logging(incremental=False)  # new handlers (an incremental setup keeps the old)
    yield
