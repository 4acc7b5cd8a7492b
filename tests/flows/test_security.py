"""Security (issue #17) of a whole run: no secret of the environment lands in a file, an uploaded object or a log.

A tiny lifecycle publishes to a moto S3 server with fake but realistic AWS and Prefect credentials in the
environment; then every file of the project, every object in the bucket, every file Prefect wrote (results,
its database) and every log line (the console and Prefect's API) is searched for each secret, as written and
base64- or hex-encoded.
"""

from __future__ import annotations

import base64
import datetime
import io
import logging
import os
import secrets
import signal
import string
import uuid
from pathlib import Path

import boto3
import pandas as pd
import pytest
import yaml

from tests.flows.helpers import stop
from tests.flows.test_lifecycle_flow import toy_project
from tests.store.conftest import moto_endpoint  # noqa: F401 (the fixture)

pytestmark = pytest.mark.slow


def _fake(alphabet: str, n: int, prefix: str = "") -> str:
    return prefix + "".join(secrets.choice(alphabet) for _ in range(n))


SECRETS = {
    "AWS_ACCESS_KEY_ID": _fake(string.ascii_uppercase + string.digits, 16, "AKIA"),
    "AWS_SECRET_ACCESS_KEY": _fake(string.ascii_letters + string.digits + "+/", 40),
    "AWS_SESSION_TOKEN": _fake(string.ascii_letters + string.digits + "+/", 300, "IQoJb3JpZ2luX2VjE"),
    "PREFECT_API_KEY": _fake(string.ascii_lowercase + string.digits, 36, "pnu_"),
}


def encodings(secret: str) -> dict[str, bytes]:
    """The secret as written, in hex, and in base64 (standard and URL-safe) at each of the 3 byte alignments."""
    raw = secret.encode()
    out = {"raw": raw, "hex": raw.hex().encode()}
    for shift in range(3):
        for name, enc in (("b64", base64.b64encode), ("b64url", base64.urlsafe_b64encode)):
            text = enc(b"\0" * shift + raw)
            # drop the characters that depend on the bytes around the secret
            out[f"{name}+{shift}"] = text[(4 * shift + 2) // 3 + 1:-4]
    return out


def leaks(where: str, data: bytes) -> list[str]:
    return [f"{where}: {name} ({how})" for name, secret in SECRETS.items()
            for how, pattern in encodings(secret).items() if pattern in data]


def test_the_scan_finds_a_secret_however_it_is_embedded() -> None:
    for secret in SECRETS.values():
        for prefix in (b"", b"a", b"ab", b"token="):
            blob = prefix + secret.encode() + b'"}'
            for data in (blob, base64.b64encode(blob), base64.urlsafe_b64encode(blob), blob.hex().encode()):
                assert leaks("x", b"..." + data + b"..."), (prefix, data[:20])
    assert leaks("x", b"AKIA" + b"0" * 16) == []


def _readable(path: Path) -> bytes:
    """A file's bytes; a parquet file's cells too (its pages may be compressed)."""
    data = path.read_bytes()
    if path.suffix == ".parquet":
        data += pd.read_parquet(io.BytesIO(data)).to_csv().encode()
    return data


def test_no_secret_lands_in_a_file_an_upload_or_a_log(tmp_path, monkeypatch, moto_endpoint, prefect_harness,  # noqa: F811
                                                       caplog, capfd):
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterTimestamp
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    from flows.lifecycle import lifecycle
    from flows.prepare import prepare

    project = tmp_path / "project"
    params_path = toy_project(project)
    params = yaml.safe_load(params_path.read_text())
    params["data"]["n_tasks"] = 1  # one cycle: wake, consolidation, dreaming, evaluation, publish, report
    params["lifecycle"] = {"diagnostics": False}
    params_path.write_text(yaml.safe_dump(params))

    bucket = f"lm-sleep-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_endpoint).create_bucket(Bucket=bucket)
    for name, value in {**SECRETS, "LM_SLEEP_S3_BUCKET": bucket, "AWS_ENDPOINT_URL_S3": moto_endpoint}.items():
        monkeypatch.setenv(name, value)
    started = datetime.datetime.now(datetime.timezone.utc)
    storage = tmp_path / "prefect-results"
    caplog.set_level(logging.INFO)
    with temporary_settings(updates={PREFECT_LOCAL_STORAGE_PATH: storage}):
        prepare(str(params_path))
        lifecycle(str(params_path))

    found = []
    files = [p for root in (project, storage) for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
    assert any(p.suffix == ".safetensors" for p in files) and any(p.name == "report.md" for p in files)
    for path in files:
        found += leaks(str(path), _readable(path))

    s3 = boto3.client("s3", endpoint_url=moto_endpoint)
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])]
    assert any(k.endswith("/summary.json") for k in keys) and any(k.endswith("experts.safetensors") for k in keys)
    for key in keys:
        obj = s3.get_object(Bucket=bucket, Key=key)
        body = obj["Body"].read()
        meta = repr(obj.get("Metadata")).encode()
        if key.endswith(".parquet"):
            body += pd.read_parquet(io.BytesIO(body)).to_csv().encode()
        found += leaks(f"s3://{bucket}/{key}", body + meta)

    out, err = capfd.readouterr()
    found += leaks("stdout/stderr", (out + err).encode())
    found += leaks("log records", "\n".join(f"{r.name} {r.getMessage()} {r.args!r}" for r in caplog.records).encode())
    with get_client(sync_client=True) as client:
        logs, offset = [], 0
        while batch := client.read_logs(log_filter=LogFilter(timestamp=LogFilterTimestamp(after_=started)),
                                        limit=200, offset=offset):
            logs += batch
            offset += len(batch)
    assert logs, "the run logged nothing to Prefect's API"
    found += leaks("Prefect API logs", "\n".join(log.message for log in logs).encode())
    assert found == []


# ---------------------------------------------------------------------------- d: servers listen on loopback


def _listening(pids: set[int] | None = None, port: int | None = None) -> list[tuple[str, int, int | None]]:
    """(address, port, pid) of every listening TCP socket of ``pids`` or on ``port``."""
    import psutil

    return [(c.laddr.ip, c.laddr.port, c.pid) for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and (pids is None or c.pid in pids) and (port is None or c.laddr.port == port)]


def _loopback(address: str) -> bool:
    import ipaddress

    return ipaddress.ip_address(address).is_loopback


def test_the_local_prefect_server_and_lm_sleep_serve_listen_on_loopback_only(tmp_path, monkeypatch):
    import subprocess
    import sys
    import time

    import psutil

    from flows.server import free_port, local_server

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with local_server(tmp_path / "server.log") as url:
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        (server,) = {pid for _, _, pid in _listening(port=port)}
        tree = {server, *(p.pid for p in psutil.Process(server).children(recursive=True))}
        sockets = _listening(tree)
        assert sockets and all(_loopback(ip) for ip, _, _ in sockets), sockets

        # lm-sleep serve is a client of that server; its runner's webserver, when enabled, is on localhost too.
        runner_port = free_port()
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")},
               "PREFECT_API_URL": url, "PREFECT_RUNNER_SERVER_ENABLE": "true",
               "PREFECT_RUNNER_SERVER_PORT": str(runner_port), "PREFECT_HOME": str(tmp_path / "prefect-home")}
        with open(tmp_path / "serve.log", "w") as log:
            serve = subprocess.Popen([sys.executable, "-m", "flows.deployments", "--params", "params.yaml"],
                                     cwd=Path(__file__).resolve().parents[2], env=env, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 120
            while not _listening(port=runner_port):
                assert serve.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "lm-sleep serve's runner never listened"
                time.sleep(0.5)
            tree = {serve.pid, *(p.pid for p in psutil.Process(serve.pid).children(recursive=True))}
            sockets = _listening(tree)
            assert sockets and all(_loopback(ip) for ip, _, _ in sockets), sockets
        finally:
            stop(serve, signal.SIGTERM)
