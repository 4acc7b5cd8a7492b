"""What the flows' command lines share: one run per state directory, refused before any flow run starts.

``python -m flows.lifecycle`` (and wake, sleep, evaluate) takes the state directory's lock
before calling its flow, so a second run on the same state fails at once with one line
that names the directory and the holder's pid, and leaves no failed flow run behind. The
flows take the same (re-entrant) lock themselves, for runs started by a deployment.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from model.config import load_params
from model.io import BusyError
from tasks.guards import lifecycle_lock


def run_locked(command: str, params_path: str, flow: Callable[..., Any], *args: Any) -> int:
    """Call ``flow(*args)`` holding the lock of the params' state directory; 1 with a message if it is taken."""
    params = load_params(params_path)
    try:
        with lifecycle_lock(params, Path(params_path).resolve().parent):
            flow(*args)
    except BusyError as e:
        print(f"{command} refused: {e}", file=sys.stderr)
        return 1
    return 0
