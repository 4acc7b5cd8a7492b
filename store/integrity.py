"""Digests of bytes, and writes that keep a file only when its SHA-256 is the recorded one."""

from __future__ import annotations

import base64
import glob
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from model.io import atomic_path
from store.errors import IntegrityError, local_space


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


def sweep_partials(dest: Path) -> None:
    """Remove temporary files that an interrupted atomic write of ``dest`` left behind."""
    if dest.parent.is_dir():
        for stale in dest.parent.glob(f".{glob.escape(dest.name)}.*.tmp"):
            stale.unlink(missing_ok=True)


def write_verified(src: IO[bytes], dest: Path, expected_sha256: str, where: str) -> Digest:
    """Copy ``src`` into ``dest`` atomically, refusing (and leaving nothing) if the SHA-256 differs."""
    sweep_partials(dest)
    with local_space(), atomic_path(dest) as tmp:
        with open(tmp, "wb") as out:
            got = copy_hashed(src, out)
        if got.sha256 != expected_sha256:
            raise IntegrityError(
                f"{where}: content SHA-256 {got.sha256} does not match the recorded {expected_sha256} "
                f"(object corrupted or modified); {dest} left untouched"
            )
    return got
