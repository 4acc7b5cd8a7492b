"""Shared test setup: offline, no telemetry, an opt-in Prefect test server, and the longest test files first."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

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
    """A temporary Prefect server and database for the whole session (started on first use)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
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


#: Seconds each test file took (setup, call and teardown of its tests, summed) in a whole-suite run on a 2-core
#: machine like CI's. `make test` hands files to its two workers in this order, longest first (with
#: ``--no-loadscope-reorder``; xdist's own order is by number of tests, which left the two longest files, of one
#: and three tests, to start last and run alone). Files it does not name go after, in collection order.
#: Refresh: ``LM_SLEEP_RECORD_DURATIONS=tests/durations.json make test``.
DURATIONS = Path(__file__).with_name("durations.json")
_seconds: defaultdict[str, float] = defaultdict(float)


def _file_of(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def file_weights(path: Path = DURATIONS) -> dict[str, float]:
    """``path``'s seconds per test file ({} without it); a file that is not that JSON object is a usage error."""
    if not path.is_file():
        return {}
    try:
        weights = json.loads(path.read_text())
    except ValueError as exc:
        raise pytest.UsageError(f"{path}: not JSON ({exc})") from None
    if not isinstance(weights, dict) or not all(
            isinstance(k, str) and isinstance(v, (int, float)) and v >= 0 for k, v in weights.items()):
        raise pytest.UsageError(f"{path}: must map each test file to its seconds (a number >= 0)")
    return {k: float(v) for k, v in weights.items()}


def longest_files_first(nodeids: list[str], weights: dict[str, float]) -> list[int]:
    """Positions of ``nodeids`` in run order: files by descending seconds (unknown: 0), ties in collection
    order, and each file's tests together in their own order."""
    first: dict[str, int] = {}
    for i, nodeid in enumerate(nodeids):
        first.setdefault(_file_of(nodeid), i)
    return sorted(range(len(nodeids)),
                  key=lambda i: (-weights.get(_file_of(nodeids[i]), 0.0), first[_file_of(nodeids[i])], i))


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    order = longest_files_first([item.nodeid for item in items], file_weights())
    items[:] = [items[i] for i in order]


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _seconds[_file_of(report.nodeid)] += report.duration


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """With ``LM_SLEEP_RECORD_DURATIONS=<path>``, write the seconds per test file of this run there (on the
    controller of an xdist run, which receives every worker's reports)."""
    dest = os.environ.get("LM_SLEEP_RECORD_DURATIONS")
    if dest and _seconds and not hasattr(session.config, "workerinput"):
        from model.io import write_json

        write_json(dest, {k: round(v, 1) for k, v in sorted(_seconds.items(), key=lambda kv: (-kv[1], kv[0]))})
