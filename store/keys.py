"""Keys, run ids and bucket names: what is allowed, and where a run's and a cycle's objects go."""

from __future__ import annotations

import re

from model.config import run_id_problem
from store.errors import InvalidKeyError

CATEGORIES = ("experts", "dreams", "reports")

_SEGMENT_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._=+-]{0,254}")
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
CYCLE_DIR_RE = re.compile(r"cycle-(\d+)")


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


def validate_prefix(prefix: str) -> str:
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
