"""The default store: a directory on the local disk."""

from __future__ import annotations

import os
from pathlib import Path

from model.io import atomic_path
from store.base import ArtifactStore, ObjectInfo
from store.errors import IntegrityError, InvalidKeyError, NotFoundError, local_space
from store.integrity import Digest, file_digest, sweep_partials, write_verified
from store.keys import validate_key, validate_prefix


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
        sweep_partials(sidecar)
        with local_space(), atomic_path(sidecar) as tmp:
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
        base = self.root / validate_prefix(prefix)
        if not base.is_dir():
            return []
        keys = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = Path(dirpath).relative_to(self.root)
            keys += [(rel / f).as_posix() for f in filenames if not f.startswith(".")]
        return sorted(keys)

    def children(self, prefix: str = "") -> list[str]:
        base = self.root / validate_prefix(prefix)
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))

    def url(self, key: str) -> str:
        return self._path(key).as_uri()
