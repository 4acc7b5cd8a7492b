"""Retries with jittered exponential backoff for the store's requests."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from store.errors import StoreError

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter: attempt i waits uniform(0, min(max_delay, base * 2**i))."""

    attempts: int = 5
    base_delay: float = 0.5
    max_delay: float = 8.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt ``attempt`` (0-based)."""
        return random.uniform(0.0, min(self.max_delay, self.base_delay * 2**attempt))


class Transient(Exception):
    """Internal: a failure worth retrying, with the StoreError to raise if retries run out."""

    def __init__(self, error: StoreError) -> None:
        super().__init__(str(error))
        self.error = error


def with_retries(fn: Callable[[], T], policy: RetryPolicy, translate: Callable[[Exception], Exception]) -> T:
    """Call ``fn``; ``translate`` maps each failure to a StoreError, or to ``Transient`` to retry it."""
    for attempt in range(policy.attempts):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - every failure goes through translate
            err = exc if isinstance(exc, (Transient, StoreError)) else translate(exc)
            if not isinstance(err, Transient):
                raise err from (exc if err is not exc else None)
            if attempt + 1 == policy.attempts:
                raise type(err.error)(f"{err.error} (after {policy.attempts} attempts)") from exc
            time.sleep(policy.delay(attempt))
    raise AssertionError("unreachable")
