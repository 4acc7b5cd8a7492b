"""The Prefect task runners that work leaves this process on: dream trial groups (``dream.trial_runner``) and a
comparison's runs (``evaluation.runner``). A local Dask cluster by default, a running cluster by address, or any
Prefect task runner by its qualified class name."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from prefect.task_runners import TaskRunner
from prefect.utilities.importtools import from_qualified_name

DASK = "prefect_dask.DaskTaskRunner"


def task_runner(qualified_name: str, kwargs: dict[str, Any], workers: int, field: str) -> TaskRunner:
    """A new (not started) instance of the task runner class ``qualified_name`` built with ``kwargs``.

    The Dask runner without kwargs makes a local cluster of ``workers`` worker processes with one thread each
    (Dask sets ``OMP_NUM_THREADS=1`` in them); it starts when the first task is submitted and stops when the runner
    exits. ``field`` names the setting in errors (e.g. ``dream.trial_runner``)."""
    try:
        cls = from_qualified_name(qualified_name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ValueError(f"{field}: cannot import {qualified_name!r}: {exc}") from exc
    kwargs = dict(kwargs)
    if not kwargs and qualified_name == DASK:
        kwargs = {"cluster_kwargs": {"n_workers": workers, "threads_per_worker": 1, "processes": True}}
    runner = cls(**kwargs)
    if not isinstance(runner, TaskRunner):
        raise ValueError(f"{field}: {qualified_name} is not a Prefect task runner")
    return runner


@contextlib.contextmanager
def api_for_workers() -> Iterator[str]:
    """Within: the Prefect API URL that task runs in other processes report to (yields it).

    Without ``PREFECT_API_URL`` this process talks to an ephemeral API server of its own,
    and a worker process would start another one on the same database. The URL of this
    process's server is put in the settings, which travel with every submitted task.
    """
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield PREFECT_API_URL.value()
        return
    url = str(get_client(sync_client=True).api_url)
    with temporary_settings(updates={PREFECT_API_URL: url}):
        yield url


@contextlib.contextmanager
def runner_for_workers(qualified_name: str, kwargs: dict[str, Any], workers: int, field: str) -> Iterator[TaskRunner]:
    """Within: the started :func:`task_runner`, its tasks reporting to this process's Prefect API
    (:func:`api_for_workers`); the runner (a local cluster, if it made one) stops on the way out."""
    with api_for_workers(), task_runner(qualified_name, kwargs, workers, field) as runner:
        yield runner
