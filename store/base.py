"""What every store offers (:class:`ArtifactStore`), and small helpers on top of it."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from store.integrity import Digest


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
