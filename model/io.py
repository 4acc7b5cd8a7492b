"""Small file helpers shared by every stage: atomic writes and checksums.

Every artifact is written to a temporary file in the destination directory and
renamed into place, so a crash never leaves a half-written file behind and an
existing file is only replaced by a complete one. A temporary's name carries the
writer's pid (``.<name>.<pid>.<random>.tmp``): what a writer killed mid-write (kill -9)
left is removed by the next write of the same destination, and a live writer's
temporary is never touched.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from model.errors import UserError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temporaries(dest: str | Path) -> list[Path]:
    """Remove the temporaries that writers of ``dest`` no longer running left beside it; return them."""
    dest = Path(dest)
    if not dest.parent.is_dir():
        return []
    pattern = re.compile(rf"\.{re.escape(dest.name)}\.(\d+)\.[^.]+\.tmp")
    removed = []
    for path in dest.parent.iterdir():
        m = pattern.fullmatch(path.name)
        if m is None or int(m.group(1)) == os.getpid() or _running(int(m.group(1))):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


class DiskFullError(UserError, OSError):
    """A write ran out of space (ENOSPC, EDQUOT); the message names the file (``path``). The previous file is kept.

    A UserError: the command line prints the message as one line and exits 1."""

    path: Path | None = None


_NO_SPACE = ("No space left on device", "Disk quota exceeded", "StorageFull")  # also as libraries wrap it


def disk_full_error(exc: BaseException, dest: str | Path) -> DiskFullError | None:
    """A one-line :class:`DiskFullError` naming ``dest`` when ``exc`` is the file system running out of space
    (an OSError's errno, or a library's wrapped I/O error such as safetensors' "os error 28"), else None."""
    if isinstance(exc, DiskFullError):
        return exc
    if not ((isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT))
            or any(text in str(exc) for text in _NO_SPACE)):
        return None
    dest = Path(dest)
    try:
        free = f"{shutil.disk_usage(dest.parent).free} bytes free"
    except OSError:
        free = "free space unknown"
    err = DiskFullError(f"{dest}: no space left on device ({free} in {dest.parent}); the previous {dest.name}, if "
                        "any, is kept as it was and no partial file is left; free some space and run again")
    err.errno = errno.ENOSPC  # (not .filename: OSError's str() would then drop the message)
    err.path = dest
    return err


def _temp_prefix(dest: Path) -> str:
    return f".{dest.name}.{os.getpid()}."


@contextlib.contextmanager
def atomic_path(dest: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; on success rename it onto ``dest``.

    On any exception the temporary file is removed and ``dest`` is untouched.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(dest)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(dest), suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual mode
        os.replace(tmp_path, dest)
    except BaseException as exc:
        tmp_path.unlink(missing_ok=True)
        if (full := disk_full_error(exc, dest)) is not None and full is not exc:
            raise full from exc
        raise


def restore_interrupted_swap(dest: str | Path) -> bool:
    """Put back the previous ``dest`` that a writer killed between :func:`atomic_dir`'s two renames left as
    ``.<name>.old`` (``dest`` itself missing); returns whether it did. A complete ``dest`` is never touched."""
    dest = Path(dest)
    old = dest.with_name(f".{dest.name}.old")
    if dest.exists() or dest.is_symlink() or not old.is_dir():
        return False
    os.replace(old, dest)
    return True


@contextlib.contextmanager
def atomic_dir(dest: str | Path) -> Iterator[Path]:
    """Yield a temporary directory beside ``dest``; on success swap it into place.

    A previous ``dest`` is kept until the new one is complete, then replaced (it is
    ``.<name>.old`` for the moment between the two renames; a writer killed in that moment
    leaves it there, and the next write of ``dest`` puts it back first).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(dest)
    restore_interrupted_swap(dest)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(dest), suffix=".tmp", dir=dest.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
        old = None
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dest, old)
        os.replace(tmp, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if (full := disk_full_error(exc, dest)) is not None and full is not exc:
            raise full from exc
        raise


def write_text(dest: str | Path, text: str) -> Path:
    """Atomically write ``text`` (UTF-8) to ``dest``."""
    with atomic_path(dest) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(dest)


def write_json(dest: str | Path, obj: Any) -> Path:
    """Atomically write ``obj`` as sorted, indented JSON (stable bytes for DVC)."""
    return write_text(dest, json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n")


def cache_root() -> Path:
    """The project's cache on this machine (``$LM_SLEEP_CACHE`` or ``~/.cache/lm-sleep``): converted models, the
    Prefect database template."""
    return Path(os.environ.get("LM_SLEEP_CACHE", Path.home() / ".cache" / "lm-sleep"))


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of a byte string."""
    return hashlib.sha256(data).hexdigest()


class BusyError(UserError, RuntimeError):
    """Another process holds the lock on a directory (e.g. a second lifecycle run on the same state)."""


_HELD: dict[str, tuple[int, int]] = {}  # lock path -> (fd, depth): re-entrant within one process


@contextlib.contextmanager
def exclusive(directory: str | Path, what: str = "run", wait: bool = False) -> Iterator[Path]:
    """Hold an exclusive lock on ``directory`` (file ``.lock`` inside) for the block.

    A second process asking for the same lock fails at once with :class:`BusyError`
    naming the holder's pid (``wait=True``: it waits until the holder is done instead);
    nested use within one process is allowed. The lock
    is released by the OS if the holder dies (kill -9 included), so no stale lock
    survives a crash.
    """
    import fcntl

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / ".lock"
    key = str(path.resolve())
    if key in _HELD:
        fd, depth = _HELD[key]
        _HELD[key] = (fd, depth + 1)
        try:
            yield path
        finally:
            fd, depth = _HELD[key]
            _HELD[key] = (fd, depth - 1)
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise BusyError(
            f"{directory}: another {what} is using this state directory (pid {holder}); "
            "wait for it to finish or stop it, then run again"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD[key] = (fd, 1)
    try:
        yield path
    finally:
        del _HELD[key]
        os.close(fd)  # closing releases the flock


def read_keyed_lines(path: Path, key: str) -> list[dict[str, Any]]:
    """JSON lines written with ``key`` (a line cut by a crash is skipped; another key: none kept)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("key") != key:
            return []
        rows.append(row)
    return rows


def write_lines(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write ``rows`` as JSON lines, atomically (a line a crash cut short is gone after a rewrite)."""
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def append_line(path: Path, row: dict[str, Any]) -> None:
    """Append one JSON line and make it durable (fsync): a progress line survives a crash right after."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())
