"""Storage faults (issue #17): an S3 outage mid-publish, failing requests, wrong credentials, a missing bucket,
a full disk, and a rerun that must not publish anything new.

Each case ends with every artifact either uploaded and verified (its bytes fetched back against
the recorded SHA-256) or waiting in the outbox, a one-line message, and `lm-sleep artifacts flush`
finishing the job once the fault is gone. S3 is a real moto server on 127.0.0.1 behind
:class:`tests.store.faultproxy.FaultProxy` (an endpoint that goes away and comes back on the same
port, or answers some requests with errors); the full disk is a small tmpfs the test mounts.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from flows.artifacts import main as artifacts_main
from model.io import DiskFullError, sha256_file, write_json
from store import (
    LocalStore,
    Outbox,
    OutOfSpaceError,
    S3Store,
    StoreError,
    UnreachableError,
    flush_outbox,
    outbox_for,
    publish_cycle,
)
from tests.store.faultproxy import FaultProxy
from tests.store.test_store import FAST, RUN, cycle_files, cycle_keys, no_partials, summary

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
        assert outbox.read()["indexes"] == [{"store": store.uri, "run_id": RUN}]  # and the index pages
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
def test_failing_requests_are_retried_and_the_publish_completes(moto_endpoint: str, bucket: str,
                                                                 tmp_path: Path) -> None:
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


# ---------------------------------------------------------------------------- the command line: bucket and credentials


def plant_cycle(params_path: Path, period: int) -> None:
    """What a cycle leaves for publishing (its state, metrics and a gate report), without training anything."""
    from model.memory.checkpoint import FORMAT_VERSION
    from model.config import load_params
    from tasks.wake import sleep_state_dir
    from tests.store.test_store import MANIFEST

    root, params = params_path.parent, load_params(params_path)
    state = sleep_state_dir(params, root, period)
    state.mkdir(parents=True, exist_ok=True)
    (state / "experts.safetensors").write_bytes(os.urandom(2048))
    write_json(state / "manifest.json", {"format_version": FORMAT_VERSION, "layers": [0, 1], "d": 8, "step": period,
                                         "levels": MANIFEST["levels"], "files": {}})
    write_json(root / params.wake.metrics_dir / f"period-{period}.json", {"loss_first": 2.0, "loss_last": 1.0})
    (root / params.dream.reports_dir / f"period-{period}").mkdir(parents=True, exist_ok=True)
    (root / params.dream.reports_dir / f"period-{period}" / "gate.md").write_text(f"# gate {period}\n")
    write_json(root / params.lifecycle.metrics_dir / f"period-{period}.json", {
        "period": period, "accuracy": {str(t): 0.9 for t in range(period + 1)}, "mean_accuracy_seen": 0.9,
        "consolidations": [], "dream_funnel": None, "wake_loss_first": 2.0, "wake_loss_last": 1.0})


def plant_report(root: Path) -> None:
    from reporting import REPORT_DIR

    (root / REPORT_DIR).mkdir(parents=True, exist_ok=True)
    (root / REPORT_DIR / "report.md").write_text("# the lifecycle report\n")
    (root / REPORT_DIR / "accuracy_matrix.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))


def project(tmp_path: Path) -> Path:
    """A toy project (2 periods) with both cycles evaluated and the report written; returns params.yaml."""
    from tests.flows.test_lifecycle_flow import toy_project

    params_path = toy_project(tmp_path)
    raw = yaml.safe_load(params_path.read_text())
    raw["lifecycle"] = {"run_id": RUN}
    params_path.write_text(yaml.safe_dump(raw))
    for period in range(2):
        plant_cycle(params_path, period)
    plant_report(tmp_path)
    return params_path


def set_auth(endpoint: str, on: bool) -> None:
    """moto's IAM authentication on (every key but the ones IAM made is refused) or off."""
    import urllib.request

    req = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=b"0" if on else b"inf", method="POST",
                                 headers={"Content-Type": "text/plain"})
    urllib.request.urlopen(req, timeout=10).close()


def objects(endpoint: str, bucket: str) -> dict[str, tuple[str, object]]:
    """Every object of the bucket with its ETag and LastModified (a rewrite changes the latter)."""
    import boto3

    listed = boto3.client("s3", endpoint_url=endpoint).list_objects_v2(Bucket=bucket).get("Contents", [])
    return {o["Key"]: (o["ETag"], o["LastModified"]) for o in listed}


@pytest.mark.slow
def test_cli_publish_and_flush_with_a_missing_bucket_or_wrong_credentials_fail_in_one_line_and_lose_nothing(
    moto_endpoint: str, bucket: str, tmp_path: Path, store_env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], prefect_harness: None,
) -> None:
    from flows.cli import main as cli

    params = str(project(tmp_path))
    outbox = outbox_for(tmp_path)
    publish, flush = ["publish", "--params", params], ["artifacts", "flush", "--root", str(tmp_path)]
    missing = f"{bucket}-gone"
    store_env.setenv("AWS_ENDPOINT_URL_S3", moto_endpoint)

    # A bucket that does not exist: publish and flush exit 1 with one line naming it and saying what to do.
    store_env.setenv("LM_SLEEP_S3_BUCKET", missing)
    assert cli(publish) == 1
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"publish incomplete: bucket '{missing}' does not exist at {moto_endpoint}")
    assert f"aws s3 mb s3://{missing}" in line and "stay queued" in line and "lm-sleep artifacts flush" in line
    queued = sorted(outbox.pending())
    per_cycle = ["experts/experts.safetensors", "experts/manifest.json", "reports/gate/gate.md",
                 "reports/metrics/cycle.json", "reports/metrics/wake.json", "summary.json"]
    report = ["reports/lifecycle/accuracy_matrix.png", "reports/lifecycle/report.md"]  # with the last cycle only
    assert queued == sorted([f"runs/{RUN}/cycle-0/{k}" for k in per_cycle]
                            + [f"runs/{RUN}/cycle-1/{k}" for k in per_cycle + report])
    assert cli(flush) == 1
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"lm-sleep artifacts: bucket '{missing}' does not exist") and "stay queued" in line
    assert sorted(outbox.pending()) == queued

    # Wrong credentials: the same, and the secret is in no message.
    store_env.setenv("LM_SLEEP_S3_BUCKET", bucket)
    store_env.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG0")
    store_env.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-7f3a9c")
    set_auth(moto_endpoint, on=True)
    try:
        assert cli(publish) == 1
        out = capsys.readouterr()
        line = one_line(out.err)
        assert line.startswith(f"publish incomplete: access denied: HeadObject s3://{bucket}/lm-sleep/runs/{RUN}/")
        assert moto_endpoint in line and "check the credentials" in line and "stay queued" in line
        assert cli(flush) == 1
        out2 = capsys.readouterr()
        assert one_line(out2.err).startswith(f"lm-sleep artifacts: access denied: HeadObject s3://{bucket}/")
        assert "not-the-secret-7f3a9c" not in out.out + out.err + out2.out + out2.err
    finally:
        set_auth(moto_endpoint, on=False)
    assert sorted(k for k in outbox.pending()) == sorted(queued * 2)  # one copy per store, nothing lost
    for entry in outbox.read()["uploads"]:
        assert sha256_file(outbox.blob(entry["sha256"])) == entry["sha256"]

    # Fixed (the right credentials; the bucket created): flush sends everything, verified.
    store_env.setenv("AWS_ACCESS_KEY_ID", "testing")
    store_env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    assert cli(flush) == 0
    S3Store(missing, endpoint_url=moto_endpoint).client.create_bucket(Bucket=missing)
    store_env.setenv("LM_SLEEP_S3_BUCKET", missing)
    assert cli(flush) == 0
    assert outbox.pending() == [] and list(outbox.blobs.iterdir()) == []
    for name in (bucket, missing):
        store = S3Store(name, endpoint_url=moto_endpoint, retry=FAST)
        keys = store.list(f"runs/{RUN}/")
        assert set(queued) <= set(keys) and f"runs/{RUN}/index.html" in keys
        for key in keys:
            store.get_file(key, tmp_path / "verify" / name / key)

    # Publishing again sends nothing new (exit 0): every object keeps its bytes and its upload time.
    before = objects(moto_endpoint, missing)
    assert cli(publish) == 0
    assert objects(moto_endpoint, missing) == before


# ---------------------------------------------------------------------------- a rerun publishes nothing new


def test_rerunning_a_finished_lifecycle_publishes_nothing_new(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The publishes of flows/lifecycle.py, twice: each cycle after its evaluation, then the last one with the
    final report. The rerun (every file already there) must send nothing: before, it sent cycle 0 again with
    the final report, which cycle 0 never had."""
    from flows.artifacts import cmd_list
    from model.config import load_params
    from tasks.publish import publish_cycle_artifacts

    monkeypatch.delenv("LM_SLEEP_S3_BUCKET", raising=False)
    monkeypatch.delenv("LM_SLEEP_ARTIFACTS_DIR", raising=False)
    params_path = project(tmp_path / "p")  # for its params only: start again from nothing evaluated
    root = params_path.parent
    for path in ("metrics", "state", "reports"):
        shutil.rmtree(root / path)
    params = load_params(params_path)

    def lifecycle(first: bool) -> list[dict]:
        out = []
        for period in range(params.data.n_tasks):
            if first:
                plant_cycle(params_path, period)
            out.append(publish_cycle_artifacts.fn(params, root, period, RUN))
        if first:
            plant_report(root)
        return out + [publish_cycle_artifacts.fn(params, root, params.data.n_tasks - 1, RUN)]

    first = lifecycle(first=True)
    assert [len(r["uploaded"]) for r in first] == [6, 6, 2 + 1]  # the last: the report and a new summary.json
    store = LocalStore(root / "artifacts")
    before = {k: (store.stat(k).sha256, store._path(k).stat().st_mtime_ns) for k in store.list()}
    again = lifecycle(first=False)
    assert [r["uploaded"] for r in again] == [[], [], []] and all(r["error"] is None for r in again)
    assert {k: (store.stat(k).sha256, store._path(k).stat().st_mtime_ns) for k in store.list()} == before
    assert not [k for k in before if k.startswith(f"runs/{RUN}/cycle-0/reports/lifecycle/")]
    assert cmd_list(RUN, store=store)


# ---------------------------------------------------------------------------- a full disk


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs mounted for the test, unmounted after it; skipped where mounting is not permitted."""
    disk = tmp_path / "disk"
    disk.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs", str(disk)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"the full-disk tests mount a tmpfs, which needs root (or CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        yield disk
    finally:
        if subprocess.run(["umount", str(disk)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def fill(disk: Path, leave: int) -> Path:
    """Make the disk's free space ``leave`` bytes (a multiple of its 4 KiB pages) with one filler file."""
    filler = disk / "filler"
    filler.unlink(missing_ok=True)
    with open(filler, "wb") as f:
        f.write(b"\0" * (shutil.disk_usage(disk).free - leave))
    assert shutil.disk_usage(disk).free == leave
    return filler


def leftovers(root: Path) -> list[Path]:
    """What an interrupted atomic write could leave: temporaries and moved-aside directories."""
    return [p for p in root.rglob("*") if p.name.endswith((".tmp", ".old"))]


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_full_disk_stops_a_state_write_in_one_line_and_keeps_the_last_good_state(small_disk: Path) -> None:
    from model.memory.checkpoint import load_state, save_state
    from model.memory.optimizer import ChunkedOptimizer
    from model.memory.wake import sft_loss
    from tests.model.helpers import tiny_with_cms, toy_batch

    lm, cms = tiny_with_cms()
    opt = ChunkedOptimizer(cms)
    state = small_disk / "state" / "sleep" / "period-0"
    metrics = small_disk / "metrics" / "lifecycle" / "period-0.json"
    save_state(cms, state, opt)  # the last good state, and its metrics
    write_json(metrics, {"period": 0, "accuracy": {"0": 0.5}})
    good = tree(small_disk)
    sft_loss(lm.model, toy_batch(lm)).backward()
    opt.step()  # the next state differs

    filler = fill(small_disk, leave=16 * 1024)  # less than the experts file (about 55 KB)
    with pytest.raises(DiskFullError) as err:
        save_state(cms, state, opt)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{state}: no space left on device")
    assert "free some space and run again" in message and err.value.errno == 28
    from flows.errors import expected, one_line as cli_line

    assert expected(err.value) and cli_line(err.value) == message  # `lm-sleep`: this line, exit 1, no traceback
    with pytest.raises(DiskFullError, match=rf"^{metrics}: no space left on device"):
        write_json(metrics, {"period": 0, "accuracy": {str(i): 0.5 for i in range(4000)}})
    filler.unlink()
    assert tree(small_disk) == good and leftovers(small_disk) == []  # byte for byte, nothing partial
    load_state(tiny_with_cms()[1], state)  # and it loads

    save_state(cms, state, opt)  # with space again, the same write goes through
    assert tree(small_disk) != good and leftovers(small_disk) == []


def test_a_full_disk_under_the_artifact_store_leaves_every_upload_stored_or_queued(
    small_disk: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("LM_SLEEP_S3_BUCKET", raising=False)
    monkeypatch.setenv("LM_SLEEP_ARTIFACTS_DIR", str(small_disk / "artifacts"))  # the store and its outbox
    store, outbox = LocalStore(small_disk / "artifacts"), outbox_for(tmp_path)
    publish_cycle(store, RUN, 0, cycle_files(tmp_path / "c0", 0), summary(0), outbox)
    good = tree(small_disk)
    files = cycle_files(tmp_path / "c1", 1, expert_bytes=256 * 1024)

    # No room to queue the cycle: nothing is queued, nothing partial is left, the store is as it was.
    filler = fill(small_disk, leave=16 * 1024)
    with pytest.raises(OutOfSpaceError) as err:
        publish_cycle(store, RUN, 1, files, summary(1), outbox)
    assert "\n" not in str(err.value) and "no space left on device to queue" in str(err.value)
    assert isinstance(err.value, StoreError) and isinstance(err.value, DiskFullError)
    filler.unlink()
    assert outbox.pending() == [] and tree(small_disk) == good and leftovers(small_disk) == []

    # Room to queue it but not to store it all: the first object is stored, the rest stays queued.
    fill(small_disk, leave=(256 + 64 + 64) * 1024)
    with pytest.raises(OutOfSpaceError) as err:
        publish_cycle(store, RUN, 1, files, summary(1), outbox)
    message = str(err.value)
    expert = store._path(f"runs/{RUN}/cycle-1/experts/experts.safetensors")
    assert "\n" not in message and message.startswith(f"{expert}: no space left on device")
    assert "1 upload(s) sent and verified, 5 stay queued" in message
    assert sorted(outbox.pending()) == sorted(sent_order(1)[1:])
    assert store.get_file(sent_order(1)[0], tmp_path / "got").read_bytes() == files[sent_order(1)[0].split(
        "cycle-1/")[1]].read_bytes()
    assert {k: v for k, v in tree(small_disk).items() if "cycle-0" in k} == {k: v for k, v in good.items()
                                                                             if "cycle-0" in k}
    assert leftovers(small_disk) == []

    # `lm-sleep artifacts flush` while the disk is full: exit 1, one line; once there is room, it finishes.
    assert artifacts_main(["flush", "--root", str(tmp_path)]) == 1
    assert one_line(capsys.readouterr().err).startswith(f"error: {expert}: no space left on device")
    (small_disk / "filler").unlink()
    assert artifacts_main(["flush", "--root", str(tmp_path)]) == 0
    assert outbox.pending() == [] and leftovers(small_disk) == []
    for key in cycle_keys(1):
        store.get_file(key, tmp_path / "verify" / key)
