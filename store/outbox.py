"""The outbox, publishing a cycle through it, and fetching a run back."""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from model.io import disk_full_error, write_json
from store.base import ArtifactStore, exists
from store.env import local_dir, store_from_env
from store.errors import (
    IntegrityError,
    InvalidKeyError,
    NotFoundError,
    OutOfSpaceError,
    StoreError,
    local_space,
)
from store.index import CycleSummary, write_indexes
from store.integrity import Digest, copy_hashed, file_digest
from store.keys import cycle_key, run_prefix, validate_run_id

OUTBOX_DIR = ".outbox"


@dataclass
class PublishResult:
    """What a publish or flush did: keys sent, keys already stored, index pages written."""

    store: str
    uploaded: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    indexes: list[str] = field(default_factory=list)


class Outbox:
    """Uploads waiting for a store: copies of their bytes (``blobs/<sha256>``) and ``pending.json``.

    ``pending.json`` = ``{"uploads": [{store, key, sha256, size}], "indexes": [{store, run_id}]}``.
    Every change to it is an atomic rewrite made under an exclusive lock on ``lock``, so
    concurrent publishers queue up and a killed one leaves either the old or the new list.
    """

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        self.blobs = self.dir / "blobs"
        self.path = self.dir / "pending.json"

    @contextlib.contextmanager
    def locked(self) -> Iterator[dict[str, list[dict[str, Any]]]]:
        """Hold the lock; yield the pending state after clearing leftovers of killed writers."""
        self.blobs.mkdir(parents=True, exist_ok=True)
        with open(self.dir / "lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                state = self.read()
                self._sweep(state)
                yield state
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def read(self) -> dict[str, list[dict[str, Any]]]:
        """The pending state (empty when there is no outbox yet)."""
        if not self.path.is_file():
            return {"uploads": [], "indexes": []}
        try:
            state = json.loads(self.path.read_text())
        except json.JSONDecodeError as e:
            raise StoreError(f"{self.path}: not valid JSON ({e}); inspect or delete the outbox") from None
        return {"uploads": list(state.get("uploads", [])), "indexes": list(state.get("indexes", []))}

    def save(self, state: Mapping[str, list[dict[str, Any]]]) -> None:
        """Rewrite ``pending.json`` atomically and drop blobs nothing refers to any more."""
        with local_space():
            write_json(self.path, {"version": 1, **state})
        self._drop_unreferenced(state)

    def _drop_unreferenced(self, state: Mapping[str, list[dict[str, Any]]]) -> None:
        referenced = {u["sha256"] for u in state["uploads"]}
        for blob in self.blobs.iterdir():
            if blob.name not in referenced:
                blob.unlink(missing_ok=True)

    def _sweep(self, state: Mapping[str, list[dict[str, Any]]]) -> None:
        """Remove what a killed writer can leave: temporary files and blobs not (yet) listed."""
        for stale in [*self.dir.glob(".*.tmp"), *self.blobs.glob(".*.tmp")]:
            stale.unlink(missing_ok=True)
        self._drop_unreferenced(state)

    def blob(self, sha256: str) -> Path:
        """Where the queued copy of bytes with this digest lives."""
        return self.blobs / sha256

    def add(self, src: IO[bytes]) -> Digest:
        """Copy ``src`` into the outbox (content-addressed); return its digest."""
        fd, tmp = tempfile.mkstemp(prefix=".incoming.", suffix=".tmp", dir=self.blobs)
        try:
            with os.fdopen(fd, "wb") as out:
                digest = copy_hashed(src, out)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.blob(digest.sha256))
        except BaseException as exc:
            Path(tmp).unlink(missing_ok=True)
            if disk_full_error(exc, self.blobs) is not None:
                what = getattr(src, "name", "an artifact")
                raise OutOfSpaceError(
                    f"{self.blobs}: no space left on device to queue {what} in the outbox "
                    f"({shutil.disk_usage(self.blobs).free} bytes free); the outbox's list is kept as it was and no "
                    "partial copy is left; free some space and run again"
                ) from exc
            raise
        return digest

    def pending(self, store: ArtifactStore | None = None) -> list[str]:
        """Keys still waiting (for ``store``, or for any store)."""
        uploads = self.read()["uploads"]
        return [u["key"] for u in uploads if store is None or u["store"] == store.uri]


def outbox_for(root: str | Path = ".", env: Mapping[str, str] | None = None) -> Outbox:
    """The outbox in the local artifacts directory (``<artifacts>/.outbox``)."""
    return Outbox(local_dir(root, env) / OUTBOX_DIR)


def _expand(files: Mapping[str, str | Path]) -> dict[str, Path]:
    """Suffix -> file; a directory becomes one entry per (non-hidden) file under it."""
    out: dict[str, Path] = {}
    for suffix, path in files.items():
        path = Path(path)
        if path.is_dir():
            for f in sorted(p for p in path.rglob("*") if p.is_file()):
                rel = f.relative_to(path)
                if not any(part.startswith(".") for part in rel.parts):
                    out[f"{suffix}/{rel.as_posix()}"] = f
        elif path.is_file():
            out[suffix] = path
        else:
            raise FileNotFoundError(f"{path}: no such file or directory (artifact {suffix!r})")
    return out


def _send(
    store: ArtifactStore, outbox: Outbox, state: dict[str, list[dict[str, Any]]], result: PublishResult
) -> None:
    """Send ``store``'s queued uploads in order into ``result``, then rebuild its queued index pages (lock held).

    Each upload leaves the list only once its object is verified, so a failure at any point
    leaves exactly the unverified ones queued.
    """
    for entry in [u for u in state["uploads"] if u["store"] == store.uri]:
        blob = outbox.blob(entry["sha256"])
        digest = file_digest(blob) if blob.is_file() else None
        if digest is None or digest.sha256 != entry["sha256"]:
            state["uploads"].remove(entry)
            outbox.save(state)
            raise IntegrityError(
                f"{blob}: the queued copy of {entry['key']} is missing or changed; dropped it from the outbox, "
                "publish that cycle again"
            )
        sent = store.put_file(blob, entry["key"], digest)
        (result.uploaded if sent else result.unchanged).append(entry["key"])
        state["uploads"].remove(entry)
        outbox.save(state)
    for entry in [i for i in state["indexes"] if i["store"] == store.uri]:
        result.indexes += write_indexes(store, entry["run_id"])
        state["indexes"].remove(entry)
        outbox.save(state)


def _flush(store: ArtifactStore, outbox: Outbox, state: dict[str, list[dict[str, Any]]]) -> PublishResult:
    """:func:`_send`; a failure's message adds what was sent, what stays queued and how it gets sent."""
    result = PublishResult(store.uri)
    try:
        _send(store, outbox, state, result)
    except StoreError as err:
        queued = outbox.pending(store)  # what the list on disk says (a failed rewrite of it keeps the old list)
        sent = len(result.uploaded) + len(result.unchanged)
        raise type(err)(
            f"{err}. {sent} upload(s) sent and verified, {len(queued)} stay queued in {outbox.dir} (local files "
            "untouched); the next publish or `lm-sleep artifacts flush` sends them"
        ) from err
    return result


def flush_outbox(store: ArtifactStore, outbox: Outbox) -> PublishResult:
    """Send everything queued for ``store`` (uploads of earlier runs that failed) and its indexes."""
    with outbox.locked() as state:
        return _flush(store, outbox, state)


def publish_cycle(
    store: ArtifactStore,
    run_id: str,
    cycle: int,
    files: Mapping[str, str | Path],
    summary: Mapping[str, Any],
    outbox: Outbox,
) -> PublishResult:
    """Queue one cycle's files, its ``summary.json`` and its index pages, then send the whole outbox.

    ``files`` maps a key suffix (``experts/...``, ``dreams/...`` or ``reports/...``) to a local
    file, or to a directory whose files go under that suffix. ``summary`` follows
    :class:`CycleSummary`. Everything is validated before anything is queued. On a store
    failure the error says what stays queued; the local files are never touched.
    """
    validate_run_id(run_id)
    paths = _expand(files)
    keys = {suffix: cycle_key(run_id, cycle, suffix) for suffix in paths}
    doc = {**CycleSummary.model_validate(dict(summary)).model_dump(mode="json"), "run_id": run_id, "cycle": cycle}
    summary_key = f"{run_prefix(run_id)}cycle-{cycle}/summary.json"
    with outbox.locked() as state:
        queued, artifacts = [], []
        try:
            for suffix, path in sorted(paths.items()):
                with open(path, "rb") as src:
                    digest = outbox.add(src)
                queued.append({"store": store.uri, "key": keys[suffix], "sha256": digest.sha256, "size": digest.size})
                artifacts.append({"key": suffix, "sha256": digest.sha256, "size": digest.size})
            body = json.dumps({**doc, "artifacts": artifacts}, indent=2, sort_keys=True, allow_nan=False) + "\n"
            digest = outbox.add(io.BytesIO(body.encode()))
            queued.append({"store": store.uri, "key": summary_key, "sha256": digest.sha256, "size": digest.size})
            new = {q["key"] for q in queued}
            uploads = [u for u in state["uploads"] if not (u["store"] == store.uri and u["key"] in new)] + queued
            index = {"store": store.uri, "run_id": run_id}
            indexes = [i for i in state["indexes"] if i != index] + [index]
            outbox.save({"uploads": uploads, "indexes": indexes})
        except BaseException:
            outbox._drop_unreferenced(outbox.read())  # copies queued before the failure (a full disk keeps no space)
            raise
        state["uploads"], state["indexes"] = uploads, indexes
        return _flush(store, outbox, state)


def publish_cycle_from_env(
    root: str | Path,
    run_id: str,
    cycle: int,
    files: Mapping[str, str | Path],
    summary: Mapping[str, Any],
    strict: bool = False,
    log: logging.Logger | logging.LoggerAdapter | None = None,
) -> dict[str, Any]:
    """Publish one cycle to the store :func:`store_from_env` configures for ``root``, through its outbox.

    A store failure is logged on ``log`` (default: this module's logger) and the files stay
    queued for the next publish. Returns ``{store, uploaded, unchanged, indexes, pending, error}``.
    With ``strict`` a store failure raises instead. Invalid run ids, keys or summaries always raise.
    """
    log = logging.getLogger(__name__) if log is None else log
    store, outbox = store_from_env(root), outbox_for(root)
    try:
        result = publish_cycle(store, run_id, cycle, files, summary, outbox)
    except InvalidKeyError:
        raise
    except StoreError as err:
        if strict:
            raise
        log.error(str(err))
        return {"store": store.uri, "uploaded": [], "unchanged": [], "indexes": [],
                "pending": outbox.pending(store), "error": str(err)}
    log.info(f"cycle {cycle} of run {run_id}: {len(result.uploaded)} uploaded, {len(result.unchanged)} unchanged "
             f"in {store.uri}; index {store.url(run_prefix(run_id) + 'index.html')}")
    return {**asdict(result), "pending": [], "error": None}


def fetch_run(store: ArtifactStore, run_id: str, dest: str | Path, cycle: int | None = None) -> list[Path]:
    """Download a run (or one cycle of it) into ``dest``, keeping the layout under ``runs/<RUN_ID>/``.

    Files already in ``dest`` with the recorded digest are kept, so an interrupted fetch resumes.
    """
    prefix = run_prefix(run_id)
    sub = f"{prefix}cycle-{int(cycle)}/" if cycle is not None else prefix
    keys = store.list(sub)
    if not keys:
        raise NotFoundError(f"no artifacts under {store.uri}/{sub}")
    if cycle is not None:
        keys += [k for k in (f"{prefix}index.html", f"{prefix}run.json") if exists(store, k)]
    out = []
    for key in keys:
        target = Path(dest) / key[len(prefix):]
        info = store.stat(key)
        if not (target.is_file() and info is not None and info.sha256 == file_digest(target).sha256):
            store.get_file(key, target)
        out.append(target)
    return out
