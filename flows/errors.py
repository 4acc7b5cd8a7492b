"""How a command reports an expected failure: one line on stderr, exit 1, no traceback.

An expected failure is a :class:`model.errors.UserError` (bad params, data, state or argument;
a busy state directory) or an artifact-store error. Its message names the file and the field,
which is all a user needs; a traceback is printed only with ``lm-sleep --debug`` (or
``LM_SLEEP_DEBUG=1``, which the stages a run starts inherit). Every other exception is a bug
and keeps its traceback.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any

from model.errors import UserError

DEBUG_ENV = "LM_SLEEP_DEBUG"


def debugging() -> bool:
    """Whether the user asked for tracebacks (``--debug`` or ``LM_SLEEP_DEBUG=1``)."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def expected(err: BaseException) -> bool:
    """A failure whose message is complete: a UserError, or an artifact-store error.

    ``store.errors`` is looked up only if something already imported it (otherwise the error
    cannot be one of its classes), so the command line does not import the store to check.
    """
    if isinstance(err, UserError):
        return True
    store = sys.modules.get("store.errors")
    return store is not None and isinstance(err, store.StoreError)


def one_line(err: BaseException) -> str:
    """The message on one line: a multi-line one (a params file with several bad fields) joined by '; '."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    head, rest = lines[0], lines[1:]
    return head + (" " if head.endswith(":") else "; ") + "; ".join(rest) if rest else head


def report(command: str, err: BaseException) -> int:
    """Print ``command: message`` as one line on stderr; return the exit code 1."""
    print(f"{command}: {one_line(err)}", file=sys.stderr)
    return 1


def reporting_errors(command: str) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Decorate a stage's ``main(argv)``: an expected failure is one line and exit 1 (re-raised when debugging),
    so ``python -m flows.<stage>`` (DVC's stages) says the same as ``lm-sleep <stage>``."""

    def wrap(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def run(*args: Any, **kwargs: Any) -> int:
            try:
                return main(*args, **kwargs)
            except Exception as err:
                if debugging() or not expected(err):
                    raise
                return report(command, err)
        return run
    return wrap
