"""The store's errors: each message names the store, endpoint and key, so the CLI prints it as one line."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from model.io import DiskFullError, disk_full_error


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
def local_space() -> Iterator[None]:
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
