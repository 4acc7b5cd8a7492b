"""The report tasks: thin Prefect wrappers over the reporting library (reporting/), which renders
every report (the lifecycle's and each comparison's) and knows nothing of Prefect."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import Task, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State, TaskRun

from model.config import Params
import reporting

__all__ = ["report_task", "write_comparison_report", "write_knowledge_report", "write_long_context_report"]


def _retry_on_os_error(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Retry only transient filesystem errors, never a missing or malformed metrics file (ReportError)."""
    return isinstance(state.result(raise_on_failure=False), OSError)


@task(retries=2, retry_delay_seconds=1, retry_condition_fn=_retry_on_os_error, cache_policy=NO_CACHE)
def report_task(root: Path, params: Params, out_dir: Path | None = None) -> dict[str, Any]:
    """Write the lifecycle report (markdown + PNGs), the dvc plot tables and the CL metrics; return the summary."""
    return reporting.write_lifecycle_report(root, params, out_dir)


@task(cache_policy=NO_CACHE)
def write_comparison_report(params: Params, root: Path, comp: Any, results: list[dict]) -> dict[str, Any]:
    """Write ``reports/<name>/`` of a class-incremental comparison as a whole, atomically; return the summary."""
    return reporting.write_comparison_report(params, root, comp, results)


@task(cache_policy=NO_CACHE)
def write_knowledge_report(params: Params, root: Path, comp: Any, results: list[dict]) -> dict[str, Any]:
    """Write ``reports/<name>/`` of a knowledge comparison as a whole, atomically; return the summary.

    The dream policy's training (method passage_sleep_trained) is read from the comparison's directory."""
    from tasks.compare import comparison_dir

    return reporting.write_knowledge_report(params, root, comp, results, comparison_dir(params, root, comp))


@task(cache_policy=NO_CACHE)
def write_long_context_report(params: Params, root: Path, comp: Any, results: list[dict]) -> dict[str, Any]:
    """Write ``reports/<name>/`` of a long-context comparison as a whole, atomically; return the summary."""
    return reporting.write_long_context_report(params, root, comp, results)
