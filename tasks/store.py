"""Prefect task that publishes a cycle to the artifact store (thin: the store is the ``store`` package)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError

from store import publish_cycle_from_env


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """The run's logger inside Prefect; this module's logger when called as plain functions."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


@task(cache_policy=NO_CACHE)
def upload_cycle_artifacts(
    root: Path, run_id: str, cycle: int, files: dict[str, Path], summary: dict[str, Any], strict: bool = False
) -> dict[str, Any]:
    """Publish one cycle to the configured store; on a store failure log it and keep the files queued.

    Returns ``{store, uploaded, unchanged, indexes, pending, error}``. With ``strict`` a store
    failure raises instead. Invalid run ids, keys or summaries always raise.
    """
    return publish_cycle_from_env(root, run_id, cycle, files, summary, strict, log=run_logger())
