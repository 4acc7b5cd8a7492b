"""The artifact store, local and on a real moto S3 server: checksums, outbox, faults, indexes, CLI, DVC."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from pydantic import ValidationError

from flows.artifacts import cmd_dvc_remote, cmd_fetch, cmd_list, cmd_open, main
from model.io import sha256_file
from store import (
    AccessDeniedError,
    ArtifactStore,
    IntegrityError,
    InvalidKeyError,
    LocalStore,
    NotFoundError,
    Outbox,
    RetryPolicy,
    S3Store,
    UnreachableError,
    experts_from_manifest,
    get_bytes,
    publish_cycle,
    store_from_env,
    validate_key,
    validate_run_id,
)
from store.index import render_run_index, render_runs_index
from store.retry import with_retries
from tasks.store import upload_cycle_artifacts
from tests.store.conftest import free_port

REPO = Path(__file__).resolve().parents[2]
FAST = RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.05)
RUN = "run-1"
MANIFEST = {  # the shape of model.memory.checkpoint.read_manifest(...)
    "levels": [
        {"name": "fast", "experts": [
            {"slot": 0, "active": True, "unlocked_at_step": 0, "origin": "init", "history": ["unlocked@0:init"],
             "sha256": "a" * 64},
            {"slot": 1, "active": False, "unlocked_at_step": None, "origin": None, "history": [], "sha256": "b" * 64},
        ]},
        {"name": "slow", "experts": [
            {"slot": 0, "active": True, "unlocked_at_step": 12, "origin": "consolidation:fast->slow@period-0",
             "history": ["unlocked@12:consolidation:fast->slow@period-0"], "sha256": "c" * 64},
        ]},
    ],
}


def s3(endpoint: str, bucket: str) -> S3Store:
    return S3Store(bucket, "lm-sleep", endpoint_url=endpoint, retry=FAST)


def cycle_files(dest: Path, cycle: int, expert_bytes: int = 4096) -> dict[str, Path]:
    """A cycle's outputs as the pipeline lays them out: a state directory, dream parquet, gate report, plot."""
    rng = random.Random(cycle)
    (dest / "state").mkdir(parents=True)
    (dest / "state" / "experts.safetensors").write_bytes(rng.randbytes(expert_bytes))
    (dest / "state" / "manifest.json").write_text(json.dumps(MANIFEST))
    (dest / "dreams.parquet").write_bytes(rng.randbytes(512))
    (dest / "gate.md").write_text(f"# gate of cycle {cycle}\n")
    (dest / "accuracy.png").write_bytes(b"\x89PNG\r\n\x1a\n" + rng.randbytes(64))
    return {
        "experts": dest / "state",
        f"dreams/period-{cycle}-dreams.parquet": dest / "dreams.parquet",
        "reports/gate.md": dest / "gate.md",
        "reports/accuracy.png": dest / "accuracy.png",
    }


ARTIFACTS = ["dreams/period-{c}-dreams.parquet", "experts/experts.safetensors", "experts/manifest.json",
             "reports/accuracy.png", "reports/gate.md"]


def cycle_keys(cycle: int) -> list[str]:
    base = f"runs/{RUN}/cycle-{cycle}/"
    return sorted([base + a.format(c=cycle) for a in ARTIFACTS] + [base + "summary.json"])


def summary(cycle: int) -> dict:
    return {
        "period": cycle,
        "accuracy": {str(t): 0.9 - 0.1 * t for t in range(cycle + 1)},
        "mean_accuracy_seen": 0.85,
        "consolidations": [{"src": "fast", "dst": "slow", "slot": 0, "seconds": 1.5, "retention_loss": 1.02,
                            "accuracy_ratio": 1.15}],
        "dream_funnel": {"generated": 16, "selected": 6, "rewarded": 3, "passed_gate": 12, "promoted": 2,
                         "rejected": 14},
        "experts": experts_from_manifest(MANIFEST),
        "wake_loss_first": 2.5,
    }


def no_partials(*roots: Path) -> list[Path]:
    """Temporary files of interrupted atomic writes under ``roots`` (should be none)."""
    return [p for root in roots if root.exists() for p in root.rglob("*.tmp")]


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.slow)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStore:
    """The same tests against the local store and the S3 store."""
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    return s3(request.getfixturevalue("moto_endpoint"), request.getfixturevalue("bucket"))


def overwrite_raw(store: ArtifactStore, key: str, data: bytes, keep_digest: bool) -> None:
    """Replace an object's bytes behind the store's back (keeping or dropping its recorded digest)."""
    if isinstance(store, LocalStore):
        store._path(key).write_bytes(data)
        if not keep_digest:
            store._sidecar(store._path(key)).unlink()
        return
    info = store.stat(key)
    meta = {"sha256": info.sha256} if keep_digest else {}
    store.client.put_object(Bucket=store.bucket, Key=store._name(key), Body=data, Metadata=meta)


# ---------------------------------------------------------------------------- validation and rendering


@pytest.mark.parametrize("bad", ["", "../x", "..", "a/b", "a\\b", "/abs", ".hidden", "a..b", "a b", "x" * 129, "é"])
def test_bad_run_ids_are_rejected(bad: str) -> None:
    with pytest.raises(InvalidKeyError, match="invalid run id"):
        validate_run_id(bad)


@pytest.mark.parametrize(
    "bad", ["", "../etc/passwd", "runs/../../x", "/etc/passwd", "a//b", "a/", "a\\b", "a/./b", "runs/.hidden", "a b"]
)
def test_bad_keys_are_rejected(bad: str, tmp_path: Path) -> None:
    with pytest.raises(InvalidKeyError, match="invalid key"):
        validate_key(bad)
    with pytest.raises(InvalidKeyError):
        LocalStore(tmp_path).put_file(__file__, bad)
    assert validate_key("runs/run-1/cycle-0/experts/experts.safetensors")
    assert validate_run_id("2025-01-01T12.00_a")


def test_publish_rejects_traversal_before_queueing_anything(tmp_path: Path) -> None:
    store, outbox = LocalStore(tmp_path / "store"), Outbox(tmp_path / "outbox")
    f = tmp_path / "f.bin"
    f.write_bytes(b"x")
    for run_id, files in [("../evil", {"reports/f": f}), (RUN, {"reports/../../../evil": f}),
                          (RUN, {"models/f": f}), (RUN, {"/reports/f": f}), (RUN, {"reports": f})]:
        with pytest.raises(InvalidKeyError):
            publish_cycle(store, run_id, 0, files, summary(0), outbox)
    with pytest.raises(ValidationError):
        publish_cycle(store, RUN, 0, {"reports/f": f}, {**summary(0), "dream_funnel": {"generated": -1}}, outbox)
    assert outbox.pending() == [] and store.list() == []
    assert not (tmp_path / "evil").exists()


def test_local_store_refuses_a_symlink_out_of_its_root(tmp_path: Path) -> None:
    (tmp_path / "store").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "store" / "runs").symlink_to(tmp_path / "outside")
    with pytest.raises(InvalidKeyError, match="outside"):
        LocalStore(tmp_path / "store").put_file(__file__, "runs/x.py")
    assert list((tmp_path / "outside").iterdir()) == []


def test_run_index_escapes_html_and_links_every_artifact() -> None:
    evil = '<script>alert("x")</script>'
    cycle = {**summary(0), "run_id": RUN, "cycle": 0, "note": evil,
             "experts": [{**experts_from_manifest(MANIFEST)[0], "origin": evil}, experts_from_manifest(MANIFEST)[1]],
             "artifacts": [{"key": k.split("/cycle-0/")[1], "size": 1, "sha256": "d" * 64} for k in cycle_keys(0)]}
    page = render_run_index(RUN, [cycle])
    assert "<script>" not in page and "&lt;script&gt;" in page
    for a in cycle["artifacts"]:
        assert f'href="cycle-0/{a["key"]}"' in page
    assert 'src="cycle-0/reports/accuracy.png"' in page
    for word in ("generated", "selected", "rewarded", "promoted", "rejected", "consolidation:fast", "unlocked at step"):
        assert word in page
    root = render_runs_index([{"run_id": RUN, "cycles": [0], "last_mean_accuracy_seen": 0.85, "dreams_promoted": 2}])
    assert f'href="runs/{RUN}/index.html"' in root
    with pytest.raises(InvalidKeyError):
        render_runs_index([{"run_id": "../x"}])


def test_experts_from_manifest_keeps_every_unlocked_expert_with_provenance() -> None:
    experts = experts_from_manifest(MANIFEST)
    assert [(e["level"], e["slot"], e["origin"], e["unlocked_at_step"]) for e in experts] == [
        ("fast", 0, "init", 0), ("slow", 0, "consolidation:fast->slow@period-0", 12)]
    assert experts[1]["sha256"] == "c" * 64


def test_store_comes_from_the_environment(tmp_path: Path) -> None:
    local = store_from_env(tmp_path, env={})
    assert isinstance(local, LocalStore) and local.root == (tmp_path / "artifacts").resolve()
    assert store_from_env(tmp_path, env={"LM_SLEEP_ARTIFACTS_DIR": "elsewhere"}).root == (tmp_path / "elsewhere")
    remote = store_from_env(tmp_path, env={"LM_SLEEP_S3_BUCKET": "my-bucket", "AWS_ENDPOINT_URL": "http://a:1",
                                           "AWS_ENDPOINT_URL_S3": "http://b:2"})
    assert isinstance(remote, S3Store)
    assert (remote.uri, remote.endpoint_url) == ("s3://my-bucket/lm-sleep", "http://b:2")
    with pytest.raises(InvalidKeyError, match="bucket"):
        store_from_env(tmp_path, env={"LM_SLEEP_S3_BUCKET": "../Bad_Bucket"})


def test_retries_back_off_then_give_up_with_the_last_error() -> None:
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("down")
        return "ok"

    def translate(e: Exception) -> Exception:
        from store.retry import Transient

        return Transient(UnreachableError(f"cannot reach: {e}"))

    assert with_retries(flaky, FAST, translate) == "ok" and len(calls) == 3
    with pytest.raises(UnreachableError, match="after 2 attempts"):
        with_retries(lambda: (_ for _ in ()).throw(ConnectionError("down")), RetryPolicy(2, 0.0, 0.0), translate)
    policy = RetryPolicy(attempts=5, base_delay=0.5, max_delay=2.0)
    assert all(0 <= policy.delay(i) <= min(2.0, 0.5 * 2**i) for i in range(8) for _ in range(20))


# ---------------------------------------------------------------------------- both stores alike


def test_round_trip_is_verified_and_idempotent(store: ArtifactStore, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(100_000))
    key = "runs/r/cycle-0/experts/e.safetensors"
    assert store.put_file(src, key) is True
    assert store.stat(key).sha256 == sha256_file(src) and store.stat(key).size == 100_000
    assert store.put_file(src, key) is False  # same bytes: skipped
    out = store.get_file(key, tmp_path / "out" / "e.safetensors")
    assert out.read_bytes() == src.read_bytes()
    assert store.list("runs/") == [key] and store.children("runs/r/") == ["cycle-0"]
    assert store.stat("runs/r/none") is None
    assert store.url(key).startswith(("file://", "s3://")) and store.url(key).endswith(key)


def test_a_corrupted_object_is_refused_and_repaired_by_the_next_put(store: ArtifactStore, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(10_000))
    key = "runs/r/cycle-0/dreams/d.parquet"
    store.put_file(src, key)
    tampered = bytearray(src.read_bytes())
    tampered[5000] ^= 1  # same size, same recorded digest, one bit off
    overwrite_raw(store, key, bytes(tampered), keep_digest=True)
    dest = tmp_path / "out" / "d.parquet"
    with pytest.raises(IntegrityError, match=r"d\.parquet.*does not match the recorded"):
        store.get_file(key, dest)
    assert not dest.exists() and no_partials(dest.parent) == []
    assert store.put_file(src, key) is True  # recorded digest equal, bytes not: rewritten
    assert store.get_file(key, dest).read_bytes() == src.read_bytes()


def test_an_object_without_a_checksum_is_refused(store: ArtifactStore, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"abc")
    store.put_file(src, "runs/r/x.bin")
    overwrite_raw(store, "runs/r/x.bin", b"abc", keep_digest=False)
    with pytest.raises(IntegrityError, match="refused"):
        store.get_file("runs/r/x.bin", tmp_path / "x.bin")
    with pytest.raises(NotFoundError):
        store.get_file("runs/r/missing.bin", tmp_path / "y.bin")
    assert not (tmp_path / "x.bin").exists()


def test_publish_builds_indexes_that_link_every_fetched_artifact(store: ArtifactStore, tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox")
    first = publish_cycle(store, RUN, 0, cycle_files(tmp_path / "c0", 0), summary(0), outbox)
    assert sorted(first.uploaded) == cycle_keys(0)
    publish_cycle(store, RUN, 1, cycle_files(tmp_path / "c1", 1), summary(1), outbox)
    again = publish_cycle(store, RUN, 0, cycle_files(tmp_path / "c0b", 0), summary(0), outbox)
    assert again.uploaded == [] and sorted(again.unchanged) == cycle_keys(0)
    assert outbox.pending() == [] and list((outbox.blobs).iterdir()) == []
    assert set(cycle_keys(0) + cycle_keys(1)) <= set(store.list(f"runs/{RUN}/"))

    dest = tmp_path / "fetched"
    cmd_fetch(RUN, dest, store=store)
    page = (dest / "index.html").read_text()
    links = set(re.findall(r'(?:href|src)="([^"#]+)"', page)) - {"../../index.html"}
    assert links == {k[len(f"runs/{RUN}/"):] for k in cycle_keys(0) + cycle_keys(1)}
    assert all((dest / link).is_file() for link in links)
    fetched = json.loads((dest / "cycle-1" / "summary.json").read_text())
    assert fetched["dream_funnel"]["promoted"] == 2 and fetched["experts"][1]["level"] == "slow"
    assert fetched["wake_loss_first"] == 2.5
    assert f'href="runs/{RUN}/index.html"' in get_bytes(store, "index.html").decode()
    assert cmd_list(store=store)[0].startswith(f"{RUN}\tcycles=2")
    assert any(line.startswith(f"runs/{RUN}/cycle-1/experts/") for line in cmd_list(RUN, store=store))
    assert cmd_open(RUN, store=store, browser=False).startswith(("file://", "http://"))


def test_interrupted_local_writes_leave_no_partial_files_after_a_rerun(tmp_path: Path) -> None:
    store, outbox = LocalStore(tmp_path / "store"), Outbox(tmp_path / "outbox")
    files = cycle_files(tmp_path / "c0", 0)
    # what kill -9 can leave: half-written temporaries of the store, the outbox list and a blob
    gate = tmp_path / "store" / "runs" / RUN / "cycle-0" / "reports" / "gate.md"
    gate.parent.mkdir(parents=True)
    (gate.parent / ".gate.md.x1y2.tmp").write_bytes(b"half")
    (outbox.blobs).mkdir(parents=True)
    (outbox.dir / ".pending.json.a1b2.tmp").write_text("{")
    (outbox.blobs / ".incoming.c3d4.tmp").write_bytes(b"half")
    (outbox.blobs / ("e" * 64)).write_bytes(b"orphan")
    publish_cycle(store, RUN, 0, files, summary(0), outbox)
    assert no_partials(tmp_path / "store", outbox.dir) == []
    assert list(outbox.blobs.iterdir()) == [] and outbox.pending() == []
    assert gate.read_text() == "# gate of cycle 0\n"


def test_cli_commands_run_against_the_configured_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LM_SLEEP_S3_BUCKET", raising=False)
    monkeypatch.setenv("LM_SLEEP_ARTIFACTS_DIR", "arts")
    publish_cycle(store_from_env(), RUN, 0, cycle_files(tmp_path / "c0", 0), summary(0), Outbox("arts/.outbox"))
    assert main(["list"]) == 0 and RUN in capsys.readouterr().out
    assert main(["fetch", RUN, "got", "--cycle", "0"]) == 0 and (tmp_path / "got" / "index.html").is_file()
    assert main(["open", RUN, "--no-browser"]) == 0
    assert capsys.readouterr().out.strip().endswith(f"arts/runs/{RUN}/index.html")
    assert main(["flush"]) == 0
    assert main(["fetch", "../etc", "got"]) == 1 and "invalid run id" in capsys.readouterr().err
    assert main(["dvc-remote"]) == 1 and "LM_SLEEP_S3_BUCKET" in capsys.readouterr().err


# ---------------------------------------------------------------------------- S3 faults


@pytest.mark.slow
def test_unreachable_endpoint_keeps_files_queued_and_a_later_publish_sends_them(
    moto_endpoint: str, bucket: str, tmp_path: Path
) -> None:
    port = free_port()
    down = S3Store(bucket, "lm-sleep", endpoint_url=f"http://127.0.0.1:{port}", retry=FAST)
    files, outbox = cycle_files(tmp_path / "c0", 0), Outbox(tmp_path / "outbox")
    before = {p: sha256_file(p) for p in (tmp_path / "c0").rglob("*") if p.is_file()}
    with pytest.raises(UnreachableError, match=rf"127\.0\.0\.1:{port}.*stay queued") as err:
        publish_cycle(down, RUN, 0, files, summary(0), outbox)
    assert "after 3 attempts" in str(err.value)
    assert {p: sha256_file(p) for p in before} == before  # local artifacts untouched
    assert sorted(outbox.pending(down)) == cycle_keys(0)

    up = s3(moto_endpoint, bucket)
    result = publish_cycle(up, RUN, 1, cycle_files(tmp_path / "c1", 1), summary(1), outbox)
    assert sorted(result.uploaded) == sorted(cycle_keys(0) + cycle_keys(1))
    assert outbox.pending() == []
    page = get_bytes(up, f"runs/{RUN}/index.html").decode()
    assert "Cycle 0 (period 0)" in page and "Cycle 1 (period 1)" in page


@pytest.mark.slow
def test_the_upload_task_logs_a_store_failure_and_keeps_the_cycle_queued(
    moto_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LM_SLEEP_S3_BUCKET", "no-such-bucket-here")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_endpoint)
    files = cycle_files(tmp_path / "c0", 0)
    out = upload_cycle_artifacts.fn(tmp_path, RUN, 0, files, summary(0))
    assert "does not exist" in out["error"] and sorted(out["pending"]) == cycle_keys(0)
    assert (tmp_path / "artifacts" / ".outbox" / "pending.json").is_file()
    with pytest.raises(NotFoundError):
        upload_cycle_artifacts.fn(tmp_path, RUN, 0, files, summary(0), strict=True)
    with pytest.raises(InvalidKeyError):
        upload_cycle_artifacts.fn(tmp_path, "../x", 0, files, summary(0))


@pytest.fixture
def moto_auth(moto_endpoint: str) -> Iterator[None]:
    """Switch moto's IAM authentication on for one test (and off again)."""

    def reset_auth(count: str) -> None:
        req = urllib.request.Request(f"{moto_endpoint}/moto-api/reset-auth", data=count.encode(), method="POST",
                                     headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(req, timeout=10).close()

    reset_auth("0")
    try:
        yield
    finally:
        reset_auth("inf")


@pytest.mark.slow
def test_access_denied_and_missing_bucket_are_clear_errors(
    moto_endpoint: str, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    iam = boto3.client("iam", endpoint_url=moto_endpoint)
    iam.create_user(UserName="reader")
    policy = {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket"], "Resource": "*"}]}
    iam.put_user_policy(UserName="reader", PolicyName="read-only", PolicyDocument=json.dumps(policy))
    access = iam.create_access_key(UserName="reader")["AccessKey"]
    outbox = Outbox(tmp_path / "outbox")
    files = cycle_files(tmp_path / "c0", 0)

    missing = S3Store("no-such-bucket-here", "lm-sleep", endpoint_url=moto_endpoint, retry=FAST)
    with pytest.raises(NotFoundError, match=r"bucket 'no-such-bucket-here' does not exist.*runs/run-1/cycle-0/"):
        publish_cycle(missing, RUN, 0, files, summary(0), outbox)

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", access["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", access["SecretAccessKey"])
    request.getfixturevalue("moto_auth")
    denied = rf"access denied: PutObject s3://{bucket}/lm-sleep/runs/run-1/cycle-0/"
    with pytest.raises(AccessDeniedError, match=denied):
        publish_cycle(s3(moto_endpoint, bucket), RUN, 0, files, summary(0), outbox)
    assert sorted(outbox.pending(s3(moto_endpoint, bucket))) == cycle_keys(0)


class StallingProxy:
    """A TCP proxy to moto that stops forwarding once a PUT of ``marker`` starts (the upload hangs)."""

    def __init__(self, upstream: str, marker: bytes) -> None:
        self.upstream, self.marker = upstream, marker
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.stalled = threading.Event()
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        host, port = self.upstream.removeprefix("http://").split(":")
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection((host, int(port)))
            self.sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, watch: bool) -> None:
        forward_more = -1  # chunks still forwarded after the marker (-1: marker not seen)
        try:
            while data := src.recv(65536):
                if watch and forward_more < 0 and self.marker in data:
                    forward_more = 2  # the request head and the start of the body reach moto
                if forward_more == 0:
                    self.stalled.set()
                    continue
                dst.sendall(data)
                forward_more -= forward_more > 0
        except OSError:
            pass

    def close(self) -> None:
        for s in [self.server, *self.sockets]:
            s.close()


@pytest.mark.slow
def test_kill_9_during_an_upload_then_a_rerun_ends_in_the_same_state(
    moto_endpoint: str, bucket: str, tmp_path: Path
) -> None:
    files = cycle_files(tmp_path / "c0", 0, expert_bytes=4 << 20)
    outbox_dir = tmp_path / "outbox"
    expert_key = f"lm-sleep/runs/{RUN}/cycle-0/experts/experts.safetensors"
    proxy = StallingProxy(moto_endpoint, f"PUT /{bucket}/{expert_key}".encode())
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"files": {k: str(v) for k, v in files.items()}, "summary": summary(0)}))
    script = (
        "import json, sys; from store import *; s = json.load(open(sys.argv[1])); "
        f"publish_cycle(S3Store({bucket!r}, 'lm-sleep', endpoint_url={proxy.url!r}), {RUN!r}, 0, s['files'], "
        f"s['summary'], Outbox({str(outbox_dir)!r}))"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(spec)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert proxy.stalled.wait(timeout=60), proc.communicate(timeout=5)[0].decode()[-2000:]
    finally:
        proc.kill()  # SIGKILL, mid-PUT
        proc.wait()
        proxy.close()
    store = s3(moto_endpoint, bucket)
    assert store.stat(f"runs/{RUN}/cycle-0/experts/experts.safetensors") is None  # no partial object
    assert sorted(Outbox(outbox_dir).pending(store)) == [k for k in cycle_keys(0) if "/dreams/" not in k]

    publish_cycle(store, RUN, 0, files, summary(0), Outbox(outbox_dir))
    clean = S3Store(f"{bucket}-clean", "lm-sleep", endpoint_url=moto_endpoint, retry=FAST)
    clean.client.create_bucket(Bucket=clean.bucket)
    publish_cycle(clean, RUN, 0, files, summary(0), Outbox(tmp_path / "clean-outbox"))
    assert {k: store.stat(k).sha256 for k in store.list()} == {k: clean.stat(k).sha256 for k in clean.list()}
    for key in store.list():
        store.get_file(key, tmp_path / "check" / key)  # every object's bytes match its digest
    assert Outbox(outbox_dir).pending() == [] and no_partials(outbox_dir, tmp_path / "c0") == []


# ---------------------------------------------------------------------------- DVC


@pytest.mark.slow
def test_dvc_push_pull_round_trip_through_the_artifact_bucket(
    moto_endpoint: str, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    monkeypatch.setenv("DVC_SITE_CACHE_DIR", str(tmp_path / "dvc-site"))

    def run(*cmd: str) -> None:
        done = subprocess.run(cmd, cwd=repo, capture_output=True, text=True)
        assert done.returncode == 0, f"{cmd}: {done.stdout}{done.stderr}"

    dvc = (sys.executable, "-m", "dvc")
    run("git", "init", "-q")
    run(*dvc, "init", "-q")
    data = repo / "data.bin"
    payload = os.urandom(50_000)
    data.write_bytes(payload)
    run(*dvc, "add", "-q", "data.bin")
    url = cmd_dvc_remote(repo, store=s3(moto_endpoint, bucket))
    assert url == f"s3://{bucket}/lm-sleep/dvc"
    local_config = (repo / ".dvc" / "config.local").read_text()
    assert url in local_config and moto_endpoint in local_config and "testing" not in local_config
    assert bucket not in (repo / ".dvc" / "config").read_text()  # the committed config stays clean
    run(*dvc, "push", "-q")
    listed = boto3.client("s3", endpoint_url=moto_endpoint).list_objects_v2(Bucket=bucket, Prefix="lm-sleep/dvc/")
    assert listed["KeyCount"] >= 1
    shutil.rmtree(repo / ".dvc" / "cache")
    data.unlink()
    run(*dvc, "pull", "-q")
    assert data.read_bytes() == payload
