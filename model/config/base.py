"""The base of every params section (unknown keys rejected, frozen), the config error, and the run-id rule."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from model.errors import UserError


class ConfigError(UserError, ValueError):
    """A params file that cannot be used; the message names the file and the field."""


#: The run id rule (the artifact store's too): one safe path segment, so a run id can never leave its
#: store root (``runs/<RUN_ID>/``). Checked when the params are loaded, not at the first upload.
RUN_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
RUN_ID_ENV = "LM_SLEEP_RUN_ID"


def run_id_problem(run_id: object) -> str | None:
    """Why ``run_id`` is not a valid run id, or None when it is (letters, digits, ``._-``, no ``..``)."""
    if not isinstance(run_id, str) or not RUN_ID_RE.fullmatch(run_id) or ".." in run_id:
        return (f"invalid run id {run_id!r}: use 1-128 letters, digits, '.', '_' or '-', starting with a "
                "letter or digit, without '..'")
    return None


def format_errors(path: Path, err: ValidationError) -> str:
    """A pydantic error as lines naming the file and each dotted field."""
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (not a known parameter; check the spelling)"
        lines.append(f"  {field}: {msg}")
    return f"{path}: invalid parameters:\n" + "\n".join(lines)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
