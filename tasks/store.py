"""The artifact store: each cycle's experts, dreams and reports, on the local disk or on S3 (docs/design.md §4).

Layout, keys relative to the store's root (on S3 the root is ``s3://BUCKET/PREFIX/``)::

    index.html                              every run, linking to each run's index
    runs/<RUN_ID>/index.html                cycles, experts with provenance, dream funnel, reports, plots
    runs/<RUN_ID>/run.json                  one short row per cycle; the root index is built from these
    runs/<RUN_ID>/cycle-<N>/summary.json    the cycle summary (:class:`CycleSummary`) and its artifacts
    runs/<RUN_ID>/cycle-<N>/{experts,dreams,reports}/...

Every object carries the SHA-256 of its bytes: S3 user metadata ``sha256`` plus S3's own
``ChecksumSHA256``, or a hidden ``.<name>.sha256`` file beside it on disk. An upload counts
only once the stored object is checked against the local bytes (size, digest, and the
ETag, which is the MD5 of a plain single-part object); a download is hashed while it is
written and refused, leaving nothing behind, if it differs from the recorded digest.

Publishing goes through an outbox (``<artifacts dir>/.outbox``): files are copied into it
and listed in ``pending.json`` before anything is sent, and an entry leaves the list only
when its object is verified. If the store is unreachable or refuses access, publishing
raises a :class:`StoreError` that names the endpoint, bucket and key, and the next publish
or flush sends what is left. Objects already stored with the same bytes are skipped, so a
run killed mid-upload ends in the same final state when rerun; S3 keeps an object only
when its whole PUT arrived and local writes are atomic renames, so no partial object is
ever visible.

Configuration comes from the environment, never params.yaml: ``LM_SLEEP_S3_BUCKET`` (unset:
the local store in ``LM_SLEEP_ARTIFACTS_DIR``, default ``artifacts/``), ``LM_SLEEP_S3_PREFIX``
(default ``lm-sleep``), ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``, and credentials and
region from boto3's standard chain (environment, ``AWS_PROFILE``, ``~/.aws``, instance roles).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import glob
import html
import io
import json
import mimetypes
import os
import random
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol, TypeVar
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field, field_validator

from model.config import run_id_problem
from model.io import DiskFullError, atomic_path, disk_full_error, write_json

T = TypeVar("T")

CATEGORIES = ("experts", "dreams", "reports")
DEFAULT_PREFIX = "lm-sleep"
DEFAULT_LOCAL_DIR = "artifacts"
OUTBOX_DIR = ".outbox"
MAX_PUT_BYTES = 5 * 1024**3  # S3's limit for one PUT; our artifacts are far below it

_SEGMENT_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._=+-]{0,254}")
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_CYCLE_DIR_RE = re.compile(r"cycle-(\d+)")


# ---------------------------------------------------------------------------- errors


class StoreError(RuntimeError):
    """An artifact-store operation failed; the message names the store, endpoint and key."""


class InvalidKeyError(StoreError, ValueError):
    """A run id, key or bucket name that is not allowed (path traversal, odd characters)."""


class UnreachableError(StoreError):
    """The store's endpoint did not answer (after retries)."""


class AccessDeniedError(StoreError):
    """The store refused the credentials or the operation."""


class NotFoundError(StoreError):
    """The bucket or the object does not exist."""


class IntegrityError(StoreError):
    """Stored bytes differ from their recorded SHA-256 (or carry none)."""


class OutOfSpaceError(StoreError, DiskFullError):
    """The local disk filled up while writing the outbox, the local store or a download (ENOSPC).

    Also a ``model.io.DiskFullError`` (an OSError): the message names the file; what was there
    before (the outbox's list, a stored object) is kept as it was.
    """


@contextlib.contextmanager
def _local_space() -> Iterator[None]:
    """Turn the local disk running out of space into an :class:`OutOfSpaceError` (a StoreError the CLI reports)."""
    try:
        yield
    except OutOfSpaceError:
        raise
    except Exception as exc:
        full = disk_full_error(exc, getattr(exc, "filename", None) or "(unknown file)")
        if full is None:
            raise
        raise OutOfSpaceError(str(full)) from exc


# ---------------------------------------------------------------------------- validation


def validate_run_id(run_id: str) -> str:
    """Return ``run_id`` if it is one safe path segment (letters, digits, ``._-``; no ``..``)."""
    if (why := run_id_problem(run_id)) is not None:  # the one rule, also checked when params load
        raise InvalidKeyError(why)
    return run_id


def validate_key(key: str) -> str:
    """Return ``key`` if it is a relative, normalised path of safe segments.

    Rejected: empty keys, absolute paths, backslashes, empty segments (``a//b``, trailing
    ``/``), ``.``/``..`` and hidden segments, and characters outside ``A-Za-z0-9._=+-``.
    """
    if not isinstance(key, str) or not key:
        raise InvalidKeyError(f"invalid key {key!r}: empty")
    if len(key) > 1024:
        raise InvalidKeyError(f"invalid key {key[:40]!r}...: longer than 1024 characters")
    if "\\" in key:
        raise InvalidKeyError(f"invalid key {key!r}: backslash")
    if key.startswith("/"):
        raise InvalidKeyError(f"invalid key {key!r}: absolute path")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise InvalidKeyError(f"invalid key {key!r}: empty, '.' or '..' segment")
        if not _SEGMENT_RE.fullmatch(segment):
            raise InvalidKeyError(
                f"invalid key {key!r}: segment {segment!r} must start with a letter, digit or '_' "
                "and use only letters, digits and ._=+-"
            )
    return key


def _validate_prefix(prefix: str) -> str:
    """A listing prefix: empty, or a valid key followed by '/'."""
    if prefix:
        if not prefix.endswith("/"):
            raise InvalidKeyError(f"invalid prefix {prefix!r}: must be empty or end with '/'")
        validate_key(prefix[:-1])
    return prefix


def validate_bucket(bucket: str) -> str:
    """Return ``bucket`` if it is a valid S3 bucket name (3-63 lowercase letters, digits, '.', '-')."""
    if not isinstance(bucket, str) or not _BUCKET_RE.fullmatch(bucket) or ".." in bucket:
        raise InvalidKeyError(f"invalid bucket name {bucket!r} (LM_SLEEP_S3_BUCKET): 3-63 of a-z 0-9 . -")
    return bucket


def run_prefix(run_id: str) -> str:
    """``runs/<RUN_ID>/``."""
    return f"runs/{validate_run_id(run_id)}/"


def cycle_key(run_id: str, cycle: int, suffix: str) -> str:
    """``runs/<RUN_ID>/cycle-<N>/<suffix>``; ``suffix`` starts with experts/, dreams/ or reports/."""
    if not isinstance(cycle, int) or isinstance(cycle, bool) or cycle < 0:
        raise InvalidKeyError(f"invalid cycle {cycle!r}: a non-negative integer")
    validate_key(suffix)
    category = suffix.split("/")[0]
    if category not in CATEGORIES or "/" not in suffix:
        raise InvalidKeyError(f"invalid artifact key {suffix!r}: must be <{'|'.join(CATEGORIES)}>/<name>")
    return f"{run_prefix(run_id)}cycle-{cycle}/{suffix}"


# ---------------------------------------------------------------------------- digests and retries


@dataclass(frozen=True)
class Digest:
    """Size, SHA-256 and MD5 of some bytes (MD5 only to compare with S3's ETag)."""

    size: int
    sha256: str
    md5: str

    @property
    def sha256_b64(self) -> str:
        """The SHA-256 as S3's ``ChecksumSHA256`` spells it (base64 of the raw digest)."""
        return base64.b64encode(bytes.fromhex(self.sha256)).decode()


def copy_hashed(src: IO[bytes], dst: IO[bytes] | None = None, chunk: int = 1 << 20) -> Digest:
    """Read ``src`` to the end (copying into ``dst`` when given) and return its digest."""
    sha, md5, size = hashlib.sha256(), hashlib.md5(usedforsecurity=False), 0
    while block := src.read(chunk):
        sha.update(block)
        md5.update(block)
        size += len(block)
        if dst is not None:
            dst.write(block)
    return Digest(size, sha.hexdigest(), md5.hexdigest())


def file_digest(path: str | Path) -> Digest:
    """Digest of a file's bytes."""
    with open(path, "rb") as f:
        return copy_hashed(f)


def _sweep_partials(dest: Path) -> None:
    """Remove temporary files that an interrupted atomic write of ``dest`` left behind."""
    if dest.parent.is_dir():
        for stale in dest.parent.glob(f".{glob.escape(dest.name)}.*.tmp"):
            stale.unlink(missing_ok=True)


def write_verified(src: IO[bytes], dest: Path, expected_sha256: str, where: str) -> Digest:
    """Copy ``src`` into ``dest`` atomically, refusing (and leaving nothing) if the SHA-256 differs."""
    _sweep_partials(dest)
    with _local_space(), atomic_path(dest) as tmp:
        with open(tmp, "wb") as out:
            got = copy_hashed(src, out)
        if got.sha256 != expected_sha256:
            raise IntegrityError(
                f"{where}: content SHA-256 {got.sha256} does not match the recorded {expected_sha256} "
                f"(object corrupted or modified); {dest} left untouched"
            )
    return got


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter: attempt i waits uniform(0, min(max_delay, base * 2**i))."""

    attempts: int = 5
    base_delay: float = 0.5
    max_delay: float = 8.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt ``attempt`` (0-based)."""
        return random.uniform(0.0, min(self.max_delay, self.base_delay * 2**attempt))


class _Transient(Exception):
    """Internal: a failure worth retrying, with the StoreError to raise if retries run out."""

    def __init__(self, error: StoreError) -> None:
        super().__init__(str(error))
        self.error = error


def with_retries(fn: Callable[[], T], policy: RetryPolicy, translate: Callable[[Exception], Exception]) -> T:
    """Call ``fn``; ``translate`` maps each failure to a StoreError, or to ``_Transient`` to retry it."""
    for attempt in range(policy.attempts):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - every failure goes through translate
            err = exc if isinstance(exc, (_Transient, StoreError)) else translate(exc)
            if not isinstance(err, _Transient):
                raise err from (exc if err is not exc else None)
            if attempt + 1 == policy.attempts:
                raise type(err.error)(f"{err.error} (after {policy.attempts} attempts)") from exc
            time.sleep(policy.delay(attempt))
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------- the stores


@dataclass(frozen=True)
class ObjectInfo:
    """What a store knows about one object without reading it."""

    key: str
    size: int
    sha256: str | None  # recorded digest; None when the object carries none
    etag_md5: str | None = None  # S3 only: MD5 of the bytes when the ETag is one


class ArtifactStore(Protocol):
    """Objects under string keys (``validate_key``), each stored with its SHA-256."""

    @property
    def uri(self) -> str:
        """Where the store's root is: ``file:///...`` or ``s3://BUCKET/PREFIX``."""

    def put_file(self, local_path: str | Path, key: str, digest: Digest | None = None) -> bool:
        """Store a file under ``key`` and verify it; False if the same bytes were already there.

        ``digest`` (of ``local_path``) saves hashing the file again when the caller has it.
        """

    def get_file(self, key: str, local_path: str | Path) -> Path:
        """Write object ``key`` to ``local_path`` atomically after checking its SHA-256."""

    def stat(self, key: str) -> ObjectInfo | None:
        """The object's size and digest, or None if there is none."""

    def list(self, prefix: str = "") -> list[str]:
        """Every key under ``prefix`` (empty, or ending in '/'), sorted."""

    def children(self, prefix: str = "") -> list[str]:
        """Names of the 'directories' right under ``prefix``, sorted."""

    def url(self, key: str) -> str:
        """A location of ``key`` for people: ``file://`` URI or ``s3://`` URI."""


def exists(store: ArtifactStore, key: str) -> bool:
    """Whether ``key`` is in ``store``."""
    return store.stat(key) is not None


def put_bytes(store: ArtifactStore, data: bytes, key: str) -> bool:
    """Store ``data`` under ``key`` (through a temporary file, so the same checks apply)."""
    with tempfile.TemporaryDirectory(prefix="lm-sleep-put-") as tmp:
        path = Path(tmp) / "object"
        path.write_bytes(data)
        return store.put_file(path, key)


def get_bytes(store: ArtifactStore, key: str) -> bytes:
    """Read a (small) object after checking its SHA-256."""
    with tempfile.TemporaryDirectory(prefix="lm-sleep-get-") as tmp:
        return store.get_file(key, Path(tmp) / "object").read_bytes()


class LocalStore(ArtifactStore):
    """The default store: a directory; each object's SHA-256 sits in a hidden ``.<name>.sha256``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    @property
    def uri(self) -> str:
        return self.root.as_uri()

    def _path(self, key: str) -> Path:
        path = self.root / validate_key(key)
        if not path.resolve().is_relative_to(self.root):  # a symlink inside the store pointing out
            raise InvalidKeyError(f"invalid key {key!r}: resolves outside {self.root}")
        return path

    @staticmethod
    def _sidecar(path: Path) -> Path:
        return path.with_name(f".{path.name}.sha256")

    def stat(self, key: str) -> ObjectInfo | None:
        path = self._path(key)
        if not path.is_file():
            return None
        sidecar = self._sidecar(path)
        sha = sidecar.read_text().strip() if sidecar.is_file() else None
        return ObjectInfo(key, path.stat().st_size, sha or None)

    def _holds(self, path: Path, digest: Digest) -> bool:
        sidecar = self._sidecar(path)
        return (
            path.is_file() and sidecar.is_file() and sidecar.read_text().strip() == digest.sha256
            and file_digest(path).sha256 == digest.sha256
        )

    def put_file(self, local_path: str | Path, key: str, digest: Digest | None = None) -> bool:
        dest = self._path(key)
        digest = digest or file_digest(local_path)
        if self._holds(dest, digest):
            return False
        sidecar = self._sidecar(dest)
        sidecar.unlink(missing_ok=True)  # a crash below leaves no digest, so the next put rewrites
        with open(local_path, "rb") as src:
            write_verified(src, dest, digest.sha256, f"{local_path} (changed while copying to {key})")
        _sweep_partials(sidecar)
        with _local_space(), atomic_path(sidecar) as tmp:
            tmp.write_text(digest.sha256 + "\n")
        return True

    def get_file(self, key: str, local_path: str | Path) -> Path:
        info = self.stat(key)
        if info is None:
            raise NotFoundError(f"no object {key!r} in {self.uri}")
        if info.sha256 is None:
            raise IntegrityError(f"{self.url(key)}: no recorded SHA-256 (not written by lm-sleep); refused")
        with open(self._path(key), "rb") as src:
            write_verified(src, Path(local_path), info.sha256, self.url(key))
        return Path(local_path)

    def list(self, prefix: str = "") -> list[str]:
        base = self.root / _validate_prefix(prefix)
        if not base.is_dir():
            return []
        keys = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = Path(dirpath).relative_to(self.root)
            keys += [(rel / f).as_posix() for f in filenames if not f.startswith(".")]
        return sorted(keys)

    def children(self, prefix: str = "") -> list[str]:
        base = self.root / _validate_prefix(prefix)
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))

    def url(self, key: str) -> str:
        return self._path(key).as_uri()


_TRANSIENT_CODES = {
    "InternalError", "ServiceUnavailable", "SlowDown", "Throttling", "ThrottlingException",
    "RequestTimeout", "RequestTimeoutException", "BadDigest", "XAmzContentSHA256Mismatch",
}
_DENIED_CODES = {
    "AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch",
    "ExpiredToken", "InvalidToken", "TokenRefreshRequired", "AccountProblem", "403",
}


class S3Store(ArtifactStore):
    """Objects in ``s3://bucket/prefix/`` through boto3, at any S3 endpoint (AWS, MinIO, moto).

    Credentials and region come from boto3's standard chain. Each request is tried up to
    ``retry.attempts`` times with jittered exponential backoff (botocore's own retries are
    off so the two do not multiply).
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = DEFAULT_PREFIX,
        endpoint_url: str | None = None,
        retry: RetryPolicy = RetryPolicy(),
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
    ) -> None:
        self.bucket = validate_bucket(bucket)
        self.prefix = validate_key(prefix.strip("/")) if prefix.strip("/") else ""
        self.endpoint_url = endpoint_url or None
        self.retry = retry
        self._timeouts = (connect_timeout, read_timeout)
        self._client: Any = None

    def __repr__(self) -> str:
        return f"S3Store({self.uri!r}, endpoint_url={self.endpoint_url!r})"

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    @property
    def client(self) -> Any:
        """The boto3 S3 client (built on first use; path-style addressing for custom endpoints)."""
        if self._client is None:
            import boto3
            from botocore.config import Config

            config = Config(
                retries={"total_max_attempts": 1, "mode": "standard"},
                connect_timeout=self._timeouts[0],
                read_timeout=self._timeouts[1],
                s3={"addressing_style": "path"} if self.endpoint_url else None,
                user_agent_extra="lm-sleep",
            )
            self._client = boto3.session.Session().client("s3", endpoint_url=self.endpoint_url, config=config)
        return self._client

    @property
    def endpoint(self) -> str:
        """The endpoint requests go to (the explicit one, else boto3's resolution)."""
        return self.endpoint_url or self.client.meta.endpoint_url

    def _name(self, key: str) -> str:
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _translate(self, op: str, name: str) -> Callable[[Exception], Exception]:
        """Map a boto3/botocore failure of ``op`` on object ``name`` to a StoreError (or a retry)."""
        from botocore import exceptions as bx

        where = f"s3://{self.bucket}/{name}"

        def translate(exc: Exception) -> Exception:
            if isinstance(exc, (bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ReadTimeoutError,
                                bx.ConnectionClosedError, bx.ResponseStreamingError, bx.ConnectionError)):
                return _Transient(UnreachableError(f"cannot reach S3 endpoint {self.endpoint} ({op} {where}): {exc}"))
            if isinstance(exc, (bx.NoCredentialsError, bx.PartialCredentialsError)):
                return StoreError(
                    f"no AWS credentials for {op} {where} at {self.endpoint}: set AWS_ACCESS_KEY_ID/"
                    "AWS_SECRET_ACCESS_KEY or AWS_PROFILE, or configure ~/.aws"
                )
            if not isinstance(exc, bx.ClientError):
                return StoreError(f"{op} {where} at {self.endpoint} failed: {type(exc).__name__}: {exc}")
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            detail = f"{code}: {error.get('Message', '')}".strip(": ")
            if code in _DENIED_CODES or status == 403:
                return AccessDeniedError(
                    f"access denied: {op} {where} (bucket '{self.bucket}', key '{name}') at {self.endpoint}: "
                    f"{detail}; check the credentials (AWS_PROFILE / AWS_ACCESS_KEY_ID) and the bucket policy"
                )
            if code == "NoSuchBucket":
                return NotFoundError(
                    f"bucket '{self.bucket}' does not exist at {self.endpoint} ({op} key '{name}'): create it "
                    f"(aws s3 mb s3://{self.bucket}) or set LM_SLEEP_S3_BUCKET to an existing one"
                )
            if code in ("NoSuchKey", "404") or status == 404:
                return NotFoundError(f"no object {where} at {self.endpoint} ({op})")
            if code in _TRANSIENT_CODES or status >= 500:
                return _Transient(StoreError(f"{op} {where} at {self.endpoint}: {detail} (HTTP {status})"))
            return StoreError(f"{op} {where} at {self.endpoint}: {detail} (HTTP {status})")

        return translate

    def _call(self, op: str, key: str, fn: Callable[[str], T]) -> T:
        """Run ``fn(object name)`` with retries and error translation."""
        name = self._name(key)
        return with_retries(lambda: fn(name), self.retry, self._translate(op, name))

    def _head(self, name: str) -> ObjectInfo | None:
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=name, ChecksumMode="ENABLED")
        except Exception as exc:
            code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        etag = str(head.get("ETag", "")).strip('"')
        plain = head.get("ServerSideEncryption") in (None, "AES256") and re.fullmatch(r"[0-9a-f]{32}", etag)
        checksum = head.get("ChecksumSHA256")
        sha = head.get("Metadata", {}).get("sha256")
        if sha and checksum and base64.b64encode(bytes.fromhex(sha)).decode() != checksum:
            sha = None  # metadata and S3's own checksum disagree: treat as unverifiable
        key = name[len(self.prefix) + 1:] if self.prefix else name
        return ObjectInfo(key, int(head["ContentLength"]), sha, etag if plain else None)

    def stat(self, key: str) -> ObjectInfo | None:
        return self._call("HeadObject", key, self._head)

    @staticmethod
    def _holds(info: ObjectInfo | None, digest: Digest) -> bool:
        return (
            info is not None and info.size == digest.size and info.sha256 == digest.sha256
            and info.etag_md5 in (None, digest.md5)
        )

    def put_file(self, local_path: str | Path, key: str, digest: Digest | None = None) -> bool:
        digest = digest or file_digest(local_path)
        if self._holds(self.stat(key), digest):
            return False
        if digest.size > MAX_PUT_BYTES:
            raise StoreError(f"{local_path}: {digest.size} bytes is over one S3 PUT ({MAX_PUT_BYTES}); split it")
        content_type = mimetypes.guess_type(key)[0] or "application/octet-stream"
        if content_type.startswith("text/"):
            content_type += "; charset=utf-8"

        def send(name: str) -> None:
            with open(local_path, "rb") as body:
                self.client.put_object(
                    Bucket=self.bucket, Key=name, Body=body, ContentType=content_type,
                    Metadata={"sha256": digest.sha256}, ChecksumAlgorithm="SHA256", ChecksumSHA256=digest.sha256_b64,
                )
            if not self._holds(self._head(name), digest):
                where = f"s3://{self.bucket}/{name}"
                raise _Transient(IntegrityError(f"{where}: stored object does not match {local_path}"))

        self._call("PutObject", key, send)
        return True

    def get_file(self, key: str, local_path: str | Path) -> Path:
        def fetch(name: str) -> None:
            where = f"s3://{self.bucket}/{name}"
            resp = self.client.get_object(Bucket=self.bucket, Key=name)
            sha = resp.get("Metadata", {}).get("sha256")
            if not sha:
                raise IntegrityError(f"{where}: no sha256 metadata (not written by lm-sleep); refused")
            with contextlib.closing(resp["Body"]) as body:
                write_verified(body, Path(local_path), sha, where)

        self._call("GetObject", key, fetch)
        return Path(local_path)

    def _list(self, prefix: str, delimiter: bool) -> list[str]:
        root = f"{self.prefix}/" if self.prefix else ""
        name = root + _validate_prefix(prefix)
        kwargs = {"Bucket": self.bucket, "Prefix": name, **({"Delimiter": "/"} if delimiter else {})}

        def fetch() -> list[str]:
            out = []
            for page in self.client.get_paginator("list_objects_v2").paginate(**kwargs):
                if delimiter:
                    out += [p["Prefix"][len(name):].rstrip("/") for p in page.get("CommonPrefixes", [])]
                else:
                    out += [o["Key"][len(root):] for o in page.get("Contents", [])]
            return sorted(out)

        return with_retries(fetch, self.retry, self._translate("ListObjectsV2", name))

    def list(self, prefix: str = "") -> list[str]:
        return self._list(prefix, delimiter=False)

    def children(self, prefix: str = "") -> list[str]:
        return self._list(prefix, delimiter=True)

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._name(key)}"

    def presigned_url(self, key: str, expires_s: int = 3600) -> str:
        """An HTTPS URL that opens ``key`` without credentials for ``expires_s`` seconds."""
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._name(key)}, ExpiresIn=expires_s
        )


def local_dir(root: str | Path = ".", env: Mapping[str, str] | None = None) -> Path:
    """The local artifacts directory: ``LM_SLEEP_ARTIFACTS_DIR`` (relative to ``root``), default ``artifacts``."""
    env = os.environ if env is None else env
    return Path(root) / env.get("LM_SLEEP_ARTIFACTS_DIR", DEFAULT_LOCAL_DIR)


def store_from_env(root: str | Path = ".", env: Mapping[str, str] | None = None) -> LocalStore | S3Store:
    """The configured store: S3 when ``LM_SLEEP_S3_BUCKET`` is set, else the local directory.

    Endpoint from ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (unset: AWS); credentials
    and region from boto3's standard chain. Nothing comes from params.yaml.
    """
    env = os.environ if env is None else env
    bucket = env.get("LM_SLEEP_S3_BUCKET", "").strip()
    if not bucket:
        return LocalStore(local_dir(root, env))
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None
    return S3Store(bucket, env.get("LM_SLEEP_S3_PREFIX", DEFAULT_PREFIX), endpoint_url=endpoint)


# ---------------------------------------------------------------------------- cycle summaries


class DreamFunnel(BaseModel):
    """How many dreams got how far in one sleep (tasks/dream.py's ``funnel``)."""

    model_config = ConfigDict(extra="forbid")

    generated: int = Field(ge=0)
    selected: int = Field(ge=0)
    rewarded: int = Field(ge=0)
    passed_gate: int | None = Field(None, ge=0)
    promoted: int = Field(ge=0)
    rejected: int = Field(ge=0)
    kept: bool | None = Field(None, description="dream.promotion_check: whether the stage's training was kept")


class ExpertRecord(BaseModel):
    """Provenance of one expert slot (a flattened entry of a checkpoint manifest's levels)."""

    model_config = ConfigDict(extra="ignore")

    level: str
    slot: int = Field(ge=0)
    active: bool = True
    origin: str | None = None
    unlocked_at_step: int | None = None
    sha256: str | None = None
    history: list[str] = []


class CycleSummary(BaseModel):
    """What one cycle reports to the index; unknown fields are kept and shown as 'other'.

    Fields: ``period`` (wake period of the cycle), ``accuracy`` (task id -> accuracy on its
    test rows after the sleep), ``mean_accuracy_seen``, ``consolidations`` (one dict per
    consolidation, e.g. src, dst, slot, retention_loss, accuracy_ratio), ``dream_funnel``
    (generated/selected/rewarded/passed_gate/promoted/rejected; None when dreaming is off) and
    ``experts`` (:func:`experts_from_manifest` of the cycle's state manifest).
    """

    model_config = ConfigDict(extra="allow")

    period: int = Field(ge=0)
    accuracy: dict[str, float] = {}
    mean_accuracy_seen: float | None = None
    consolidations: list[dict[str, Any]] = []
    dream_funnel: DreamFunnel | None = None
    experts: list[ExpertRecord] = []

    @field_validator("accuracy", mode="before")
    @classmethod
    def _task_ids_as_text(cls, value: Any) -> Any:
        return {str(k): v for k, v in value.items()} if isinstance(value, Mapping) else value


def experts_from_manifest(manifest: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every expert that was ever unlocked, from a ``model.checkpoint.read_manifest`` dict."""
    out = []
    for li, level in enumerate(manifest.get("levels", [])):
        for e in level.get("experts", []):
            if e.get("active") or e.get("origin") is not None:
                out.append({"level": str(level.get("name", li)), **{k: e.get(k) for k in
                            ("slot", "active", "origin", "unlocked_at_step", "sha256")},
                            "history": list(e.get("history", []))})
    return out


# ---------------------------------------------------------------------------- index pages

_CSS = (
    "body{font-family:system-ui,sans-serif;margin:2em;max-width:75em;color:#222}"
    "table{border-collapse:collapse;margin:.5em 0 1.2em}td,th{border:1px solid #ccc;padding:.25em .6em;"
    "text-align:left;vertical-align:top}th{background:#f3f3f3}code{font-size:.9em}"
    "img{max-width:100%;border:1px solid #ddd;margin:.5em 0}section{border-top:2px solid #888;margin-top:2em}"
)
_FUNNEL = ("generated", "selected", "rewarded", "passed_gate", "promoted", "rejected", "kept")
_CONSOLIDATION_FIRST = ("src", "dst", "slot", "retention_loss", "retention_accuracy", "accuracy_ratio")


def _e(value: Any) -> str:
    """Escaped text of a value (floats to 4 significant digits, None as '-', containers as JSON)."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return html.escape(f"{value:.4g}")
    if isinstance(value, (dict, list)):
        return html.escape(json.dumps(value, sort_keys=True))
    return html.escape(str(value))


def _link(href: str, text: str) -> str:
    return f'<a href="{html.escape(quote(href), quote=True)}">{html.escape(text)}</a>'


def _table(headers: list[str], rows: list[list[str]]) -> str:
    """An HTML table; ``rows`` hold already-escaped cells."""
    if not rows:
        return "<p>none</p>"
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _page(title: str, body: str) -> str:
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_CSS}</style></head><body>\n{body}\n</body></html>\n"
    )


def _short(sha: str | None) -> str:
    return f'<code title="{html.escape(sha)}">{html.escape(sha[:12])}</code>' if sha else "-"


def _experts_table(experts: list[dict[str, Any]]) -> str:
    rows = [[_e(x.get("level")), _e(x.get("slot")), _e(x.get("active")), _e(x.get("origin")),
             _e(x.get("unlocked_at_step")), _short(x.get("sha256")), _e("; ".join(x.get("history") or []))]
            for x in experts]
    return _table(["level", "slot", "active", "origin", "unlocked at step", "sha256", "history"], rows)


def _cycle_section(c: Mapping[str, Any]) -> str:
    """One cycle of the run index; links are relative to ``runs/<RUN_ID>/``."""
    n = int(c["cycle"])
    base = f"cycle-{n}/"
    known = set(CycleSummary.model_fields) | {"run_id", "cycle", "artifacts"}
    funnel = c.get("dream_funnel")
    consolidations = c.get("consolidations") or []
    seen = {k for x in consolidations for k in x}
    cols = [k for k in _CONSOLIDATION_FIRST if k in seen] + sorted(seen - set(_CONSOLIDATION_FIRST))
    artifacts = sorted(c.get("artifacts") or [], key=lambda a: a["key"])
    plots = [a for a in artifacts if a["key"].lower().endswith(".png")]
    parts = [
        f'<section id="cycle-{n}"><h2>Cycle {n} (period {_e(c.get("period"))})</h2>',
        f'<p>{_link(base + "summary.json", "summary.json")}</p>',
        "<h3>Accuracy on seen tasks</h3>",
        _table(["task", "accuracy"], [[_e(t), _e(a)] for t, a in (c.get("accuracy") or {}).items()]),
        f"<p>mean over seen tasks: {_e(c.get('mean_accuracy_seen'))}</p>",
        "<h3>Consolidations</h3>",
        _table(cols, [[_e(x.get(k)) for k in cols] for x in consolidations]),
        "<h3>Dreams</h3>",
        _table([k.replace("_", " ") for k in _FUNNEL], [[_e(funnel.get(k)) for k in _FUNNEL]])
        if funnel else "<p>no dreaming</p>",
        "<h3>Experts</h3>", _experts_table(c.get("experts") or []),
        "<h3>Plots</h3>",
        "".join(f'<figure><img src="{html.escape(quote(base + a["key"]), quote=True)}" alt="{html.escape(a["key"])}">'
                f'<figcaption>{html.escape(a["key"])}</figcaption></figure>' for a in plots) or "<p>none</p>",
        "<h3>Artifacts</h3>",
        _table(["artifact", "bytes", "sha256"],
               [[_link(base + a["key"], a["key"]), _e(a.get("size")), _short(a.get("sha256"))] for a in artifacts]),
    ]
    other = {k: v for k, v in c.items() if k not in known}
    if other:
        parts += ["<h3>Other</h3>", _table(["field", "value"], [[_e(k), _e(v)] for k, v in other.items()])]
    return "\n".join(parts) + "</section>"


def render_run_index(run_id: str, cycles: list[Mapping[str, Any]]) -> str:
    """The page ``runs/<RUN_ID>/index.html``: an overview table, then every cycle in full.

    ``cycles`` are the cycles' ``summary.json`` documents: a :class:`CycleSummary` plus
    ``run_id``, ``cycle`` and ``artifacts`` ([{key, size, sha256}], keys relative to the cycle).
    All text is HTML-escaped and every link is relative, so the page works from the bucket
    (static website) and from a fetched or local copy alike.
    """
    validate_run_id(run_id)
    cycles = sorted(cycles, key=lambda c: int(c["cycle"]))
    rows = [[
        f'<a href="#cycle-{int(c["cycle"])}">{int(c["cycle"])}</a>', _e(c.get("period")),
        _e(c.get("mean_accuracy_seen")), _e(len(c.get("consolidations") or [])),
        _e((c.get("dream_funnel") or {}).get("promoted")),
        _e(sum(1 for x in c.get("experts") or [] if x.get("active"))),
    ] for c in cycles]
    body = "\n".join([
        f"<p>{_link('../../index.html', 'all runs')}</p>",
        f"<h1>Run {html.escape(run_id)}</h1>",
        _table(["cycle", "period", "mean accuracy (seen)", "consolidations", "dreams promoted", "active experts"],
               rows),
        *(_cycle_section(c) for c in cycles),
    ])
    return _page(f"lm-sleep run {run_id}", body)


def run_record(run_id: str, cycles: list[Mapping[str, Any]]) -> dict[str, Any]:
    """The short ``runs/<RUN_ID>/run.json`` row the root index is built from."""
    cycles = sorted(cycles, key=lambda c: int(c["cycle"]))
    last = cycles[-1] if cycles else {}
    return {
        "run_id": run_id,
        "cycles": [int(c["cycle"]) for c in cycles],
        "last_mean_accuracy_seen": last.get("mean_accuracy_seen"),
        "dreams_promoted": sum((c.get("dream_funnel") or {}).get("promoted", 0) for c in cycles),
    }


def render_runs_index(runs: list[Mapping[str, Any]]) -> str:
    """The root ``index.html``: one row per run (a :func:`run_record`) linking to its page."""
    rows = [[
        _link(f"runs/{validate_run_id(r['run_id'])}/index.html", r["run_id"]), _e(len(r.get("cycles") or [])),
        _e(r.get("last_mean_accuracy_seen")), _e(r.get("dreams_promoted")),
    ] for r in sorted(runs, key=lambda r: r["run_id"])]
    body = "<h1>lm-sleep runs</h1>\n" + _table(
        ["run", "cycles", "mean accuracy after last cycle", "dreams promoted"], rows
    )
    return _page("lm-sleep runs", body)


def read_cycle_summaries(store: ArtifactStore, run_id: str) -> list[dict[str, Any]]:
    """Every ``cycle-N/summary.json`` of a run, in cycle order."""
    prefix = run_prefix(run_id)
    cycles = sorted(int(m.group(1)) for d in store.children(prefix) if (m := _CYCLE_DIR_RE.fullmatch(d)))
    keys = [f"{prefix}cycle-{n}/summary.json" for n in cycles]
    return [json.loads(get_bytes(store, k)) for k in keys if exists(store, k)]


def list_runs(store: ArtifactStore) -> list[dict[str, Any]]:
    """The ``run.json`` record of every run in the store."""
    out = []
    for run_id in store.children("runs/"):
        key = f"runs/{run_id}/run.json"
        if run_id_problem(run_id) is None and exists(store, key):
            out.append(json.loads(get_bytes(store, key)))
    return out


def write_indexes(store: ArtifactStore, run_id: str) -> list[str]:
    """Rebuild ``runs/<RUN_ID>/index.html``, its ``run.json`` and the root ``index.html``."""
    cycles = read_cycle_summaries(store, run_id)
    record = json.dumps(run_record(run_id, cycles), indent=2, sort_keys=True).encode() + b"\n"
    put_bytes(store, record, f"{run_prefix(run_id)}run.json")
    put_bytes(store, render_run_index(run_id, cycles).encode(), f"{run_prefix(run_id)}index.html")
    put_bytes(store, render_runs_index(list_runs(store)).encode(), "index.html")
    return [f"{run_prefix(run_id)}run.json", f"{run_prefix(run_id)}index.html", "index.html"]


# ---------------------------------------------------------------------------- the outbox


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
        with _local_space():
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


# ---------------------------------------------------------------------------- Prefect tasks

import logging  # noqa: E402

from prefect import get_run_logger, task  # noqa: E402 - the pure code above must not need Prefect
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.exceptions import MissingContextError  # noqa: E402


def _logger() -> logging.Logger | logging.LoggerAdapter:
    """The run's logger inside Prefect; this module's logger when called as plain functions."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


@task(cache_policy=NO_CACHE)
def upload_cycle_artifacts(
    root: Path, run_id: str, cycle: int, files: dict[str, Path], summary: dict[str, Any], strict: bool = False
) -> dict[str, Any]:
    """Publish one cycle to the configured store; on a store failure log it and keep the files queued.

    Returns ``{store, uploaded, unchanged, indexes, pending, error}``. With ``strict`` a store
    failure raises instead. Invalid run ids, keys or summaries always raise.
    """
    log = _logger()
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
