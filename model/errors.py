"""The one base class of every error a user can fix from its message alone.

A bad params file, data file, state directory or argument, or a state directory another run
holds, is not a bug: its message names the file and the field (or row) and says what to do,
so ``lm-sleep`` prints it as one line and exits 1, without a traceback (``--debug`` shows one).
Anything else is a bug and keeps its traceback. Modules subclass :class:`UserError` (together
with the builtin they used before, e.g. ``ValueError``), so the command line catches one class
instead of a growing list.
"""

from __future__ import annotations


class UserError(Exception):
    """An expected failure whose message is complete: it names the file and the field or row."""


class ArgumentError(UserError, ValueError):
    """A command-line argument that cannot be used (the message names the option)."""
