"""Storage faults (issue #17): an S3 outage mid-publish, failing requests, wrong credentials, a missing bucket,
a full disk, and a rerun that must not publish anything new.

Each case ends with every artifact either uploaded and verified (its bytes fetched back against
the recorded SHA-256) or waiting in the outbox, a one-line message, and `lm-sleep artifacts flush`
finishing the job once the fault is gone. S3 is a real moto server on 127.0.0.1 behind
:class:`tests.tasks.faultproxy.FaultProxy` (an endpoint that goes away and comes back on the same
port, or answers some requests with errors); the full disk is a small tmpfs the test mounts.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from flows.artifacts import main as artifacts_main
from model.io import DiskFullError, sha256_file, write_json
from tasks.store import (
    AccessDeniedError,
    LocalStore,
    NotFoundError,
    Outbox,
    OutOfSpaceError,
    S3Store,
    StoreError,
    UnreachableError,
    flush_outbox,
    outbox_for,
    publish_cycle,
)
from tests.tasks.faultproxy import FaultProxy
from tests.tasks.test_store import FAST, RUN, cycle_files, cycle_keys, moto_auth, no_partials, summary  # noqa: F401

ENV = {"LM_SLEEP_S3_PREFIX": "lm-sleep"}


def sent_order(cycle: int) -> list[str]:
    """The order publish sends a cycle in: its files by key, then summary.json."""
    return [k for k in cycle_keys(cycle) if not k.endswith("summary.json")] + [f"runs/{RUN}/cycle-{cycle}/summary.json"]


def assert_verified(store: S3Store | LocalStore, keys: list[str], files: dict[str, Path], tmp: Path) -> None:
    """Every key is stored, fetches back against its recorded SHA-256, and equals the local file it came from."""
    local = {f"runs/{RUN}/cycle-0/{suffix}": path for suffix, path in files.items() if path.is_file()}
    for suffix, path in files.items():
        if path.is_dir():
            local.update({f"runs/{RUN}/cycle-0/{suffix}/{p.name}": p for p in path.iterdir()})
    for key in keys:
        got = store.get_file(key, tmp / "verify" / key)  # raises IntegrityError if the bytes differ from the digest
        if key in local:
            assert sha256_file(got) == sha256_file(local[key]), key


def one_line(text: str) -> str:
    """The last line of a command's stderr; the message must be that line alone."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert lines, "no message"
    assert "Traceback" not in text, text
    return lines[-1]


@pytest.fixture
def store_env(monkeypatch: pytest.MonkeyPatch, moto_endpoint: str) -> Iterator[pytest.MonkeyPatch]:
    """The environment `lm-sleep` reads its store from (the test sets the bucket and endpoint)."""
    for key, value in ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("LM_SLEEP_ARTIFACTS_DIR", raising=False)
    yield monkeypatch


# ---------------------------------------------------------------------------- an outage mid-publish


@pytest.mark.slow
def test_an_outage_mid_publish_leaves_exactly_the_unsent_keys_queued_and_flush_sends_them(
    moto_endpoint: str, bucket: str, tmp_path: Path, store_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The endpoint goes away when the 4th PUT arrives: three objects landed (and were verified), the rest did not.
    proxy = FaultProxy(moto_endpoint, lambda n, method, path: "refuse" if method == "PUT" and n == 4 else None)
    files = cycle_files(tmp_path / "c0", 0)
    outbox = outbox_for(tmp_path)
    store = S3Store(bucket, "lm-sleep", endpoint_url=proxy.url, retry=FAST)
    direct = S3Store(bucket, "lm-sleep", endpoint_url=moto_endpoint, retry=FAST)  # behind the proxy's back
    try:
        with pytest.raises(UnreachableError) as err:
            publish_cycle(store, RUN, 0, files, summary(0), outbox)
        message = str(err.value)
        assert "\n" not in message and proxy.url.removeprefix("http://") in message
        assert "3 upload(s) sent and verified, 3 stay queued" in message and "lm-sleep artifacts flush" in message
        assert not proxy.is_up
        landed = direct.list(f"runs/{RUN}/")
        assert landed == sorted(sent_order(0)[:3])
        assert sorted(outbox.pending(store)) == sorted(set(cycle_keys(0)) - set(landed))  # exactly the unsent ones
        assert_verified(direct, landed, files, tmp_path)

        # While it is down, a flush fails the same way: exit 1, one line naming the endpoint, nothing lost.
        store_env.setenv("LM_SLEEP_S3_BUCKET", bucket)
        store_env.setenv("AWS_ENDPOINT_URL_S3", proxy.url)
        assert artifacts_main(["flush", "--root", str(tmp_path)]) == 1
        line = one_line(capsys.readouterr().err)
        assert line.startswith("error: cannot reach S3 endpoint " + proxy.url) and "3 stay queued" in line
        assert sorted(outbox.pending(store)) == sorted(set(cycle_keys(0)) - set(landed))

        # The endpoint comes back on the same port: the flush sends the rest and the index pages.
        proxy.up()
        assert artifacts_main(["flush", "--root", str(tmp_path)]) == 0
        assert "3 uploaded, 0 already there, 3 index page(s) written" in capsys.readouterr().out
    finally:
        proxy.close()
    assert outbox.pending() == [] and list(outbox.blobs.iterdir()) == []
    stored = direct.list(f"runs/{RUN}/")
    assert set(cycle_keys(0)) <= set(stored) and f"runs/{RUN}/index.html" in stored
    assert_verified(direct, stored, files, tmp_path)
    assert no_partials(outbox.dir, tmp_path / "c0") == []


# ---------------------------------------------------------------------------- failing requests


@pytest.mark.slow
def test_failing_requests_are_retried_and_the_publish_completes(moto_endpoint: str, bucket: str, tmp_path: Path) -> None:
    # The first request of each kind to each object fails: a PUT answered 503 SlowDown (nothing stored) or cut
    # after the object was stored (the answer never arrives), a HEAD or GET answered 500. The retries go through.
    paths: dict[str, int] = {}
    seen: set[tuple[str, str]] = set()

    def flaky(n: int, method: str, path: str) -> int | str | None:
        index = paths.setdefault(path, len(paths))
        if (method, path) in seen:
            return None
        seen.add((method, path))
        if method == "PUT":
            return 503 if index % 2 == 0 else "drop"
        return 500 if method == "GET" or index % 3 == 0 else None

    files = cycle_files(tmp_path / "c0", 0)
    outbox = Outbox(tmp_path / "outbox")
    with FaultProxy(moto_endpoint, flaky) as proxy:
        result = publish_cycle(S3Store(bucket, "lm-sleep", endpoint_url=proxy.url, retry=FAST), RUN, 0, files,
                               summary(0), outbox)
    faults = [status for _, _, status in proxy.log if status in (500, 503, "dropped")]
    assert {500, 503, "dropped"} <= set(faults)  # every kind of fault happened, and each was retried through
    assert sorted(result.uploaded) == cycle_keys(0) and outbox.pending() == []
    direct = S3Store(bucket, "lm-sleep", endpoint_url=moto_endpoint, retry=FAST)
    assert_verified(direct, direct.list(f"runs/{RUN}/"), files, tmp_path)


@pytest.mark.slow
def test_a_request_that_keeps_failing_queues_the_rest_and_says_which(moto_endpoint: str, bucket: str,
                                                                      tmp_path: Path) -> None:
    broken = True

    def expert_put_fails(n: int, method: str, path: str) -> int | None:
        return 500 if broken and method == "PUT" and path.endswith("experts.safetensors") else None

    files = cycle_files(tmp_path / "c0", 0)
    outbox = Outbox(tmp_path / "outbox")
    with FaultProxy(moto_endpoint, expert_put_fails) as proxy:
        store = S3Store(bucket, "lm-sleep", endpoint_url=proxy.url, retry=FAST)
        with pytest.raises(StoreError) as err:
            publish_cycle(store, RUN, 0, files, summary(0), outbox)
        message = str(err.value)
        assert "\n" not in message
        assert f"PutObject s3://{bucket}/lm-sleep/runs/{RUN}/cycle-0/experts/experts.safetensors" in message
        assert "InternalError" in message and "(after 3 attempts)" in message
        assert "1 upload(s) sent and verified, 5 stay queued" in message
        assert sorted(outbox.pending(store)) == sorted(sent_order(0)[1:])
        assert [s for m, p, s in proxy.log if m == "PUT" and p.endswith("experts.safetensors")] == [500] * 3
        broken = False
        flushed = flush_outbox(store, outbox)
    assert sorted(flushed.uploaded) == sorted(sent_order(0)[1:]) and outbox.pending() == []
    direct = S3Store(bucket, "lm-sleep", endpoint_url=moto_endpoint, retry=FAST)
    assert_verified(direct, direct.list(f"runs/{RUN}/"), files, tmp_path)
