"""A stand-in for the few Prefect names that tasks/knowledge.py and the modules it imports use at import time,
for flows/knowledge_shards.py on a machine where Prefect is not installed (a lent GPU with only the ML stack).

It is put on ``sys.path`` by flows/knowledge_shards.py only when ``import prefect`` fails (or
``LM_SLEEP_NO_PREFECT=1``); nothing else ever imports it. ``@task`` returns the function itself (no retries,
no caching, no task runs: the shards call the tasks' functions directly) and ``get_run_logger`` is a
standard-library logger. Everything the tasks compute and write is the project's own code.
"""

from __future__ import annotations

import logging
from typing import Any

__version__ = "0+lm-sleep-stand-in"


class Task:  # only named in annotations
    pass


def task(fn: Any = None, **_options: Any) -> Any:
    """``@task`` and ``@task(...)``: the function, unchanged."""
    if fn is None:
        return lambda f: f
    return fn


def get_run_logger() -> logging.Logger:
    return logging.getLogger("lm-sleep")
