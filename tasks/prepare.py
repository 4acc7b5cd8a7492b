"""Prefect tasks of the ``prepare`` stage: load, build, validate and write the stream.

The work is done by ``model.data.stream`` and ``checks``; these wrappers
add retries (for file I/O only) and write the validation report and the stream files.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import Task, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State, TaskRun

from checks import StreamValidation, StreamValidationError, validate_stream
from model.config import DataConfig, SourceConfig
from model.data.stream import PLAN_FILE, STREAM_FILE, build_stream, load_source, task_file
from model.io import atomic_path, write_json, write_text

__all__ = [
    "StreamValidationError",
    "build_class_stream",
    "check_and_report_stream",
    "load_dataset",
    "validate_class_stream",
    "write_stream",
    "write_stream_files",
]


def _retry_on_os_error(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Retry only transient filesystem errors, never bad data (DataError is not an OSError)."""
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, OSError)


@task(retries=2, retry_delay_seconds=1, retry_condition_fn=_retry_on_os_error, cache_policy=NO_CACHE)
def load_dataset(cfg: SourceConfig, root: Path) -> pd.DataFrame:
    """Read the labelled source dataset named in params (paths relative to ``root``)."""
    return load_source(cfg, root)


@task(cache_policy=NO_CACHE)
def build_class_stream(df: pd.DataFrame, cfg: DataConfig) -> tuple[pd.DataFrame, dict[int, list[str]]]:
    """Build the seeded class-incremental stream and its task plan."""
    return build_stream(df, cfg)


def check_and_report_stream(df: pd.DataFrame, plan: dict[int, list[str]], report_dir: Path) -> StreamValidation:
    """Run the GX suite, write validation.json/.md, and raise StreamValidationError on failure."""
    validation = validate_stream(df, plan)
    report_dir = Path(report_dir)
    write_json(report_dir / "validation.json", validation.to_json())
    md_path = write_text(report_dir / "validation.md", validation.to_markdown())
    if not validation.success:
        raise StreamValidationError(validation, str(md_path))
    return validation


@task(cache_policy=NO_CACHE)
def validate_class_stream(df: pd.DataFrame, plan: dict[int, list[str]], report_dir: Path) -> StreamValidation:
    """:func:`check_and_report_stream` as the prepare stage's task."""
    return check_and_report_stream(df, plan, report_dir)


def write_stream_files(df: pd.DataFrame, plan: dict[int, list[str]], out_dir: Path) -> Path:
    """Write stream.parquet, tasks.json and one shard per task (tasks/task-N.parquet) into ``out_dir``.

    They are renamed in only when all are complete.
    """
    out_dir = Path(out_dir)
    stream_path = out_dir / STREAM_FILE
    with contextlib.ExitStack() as stack:  # every file is renamed in only once all are complete
        tmp_stream = stack.enter_context(atomic_path(stream_path))
        tmp_plan = stack.enter_context(atomic_path(out_dir / PLAN_FILE))
        shards = {t: stack.enter_context(atomic_path(task_file(out_dir, t))) for t in plan}
        df.to_parquet(tmp_stream, index=False, engine="pyarrow")
        write_json(tmp_plan, {str(task_id): labels for task_id, labels in plan.items()})
        for t, tmp in shards.items():
            df[df["task"] == t].to_parquet(tmp, index=False, engine="pyarrow")
    return stream_path


@task(retries=2, retry_delay_seconds=1, retry_condition_fn=_retry_on_os_error, cache_policy=NO_CACHE)
def write_stream(df: pd.DataFrame, plan: dict[int, list[str]], out_dir: Path) -> Path:
    """:func:`write_stream_files` as a task, retried on transient filesystem errors."""
    return write_stream_files(df, plan, out_dir)
