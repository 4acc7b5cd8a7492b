"""What a flow checks and holds before its tasks run: the lock of the directory a run writes, and the inputs a
stage reads (the period is a task of the prepared stream; the state it starts from opens).

A check fails before any flow run starts, with a DataError or CheckpointError naming the file; a lock another
run holds fails with a BusyError naming the directory and the holder's pid (``model.io.exclusive``).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path

from model.config import DataConfig, Params
from model.data.stream import build_stream, check_period, load_source
from model.decoding.loading import load_ahead
from model.io import exclusive
from model.memory.checkpoint import check_state
from tasks.wake import consolidated_state_dir, sleep_state_dir, wake_state_dir


def locked(path: Path, what: str) -> AbstractContextManager:
    """The (re-entrant, inter-process) lock of ``path``, held by one ``what`` (e.g. "comparison run") at a time."""
    return exclusive(path, what)


def lifecycle_lock(params: Params, root: Path) -> AbstractContextManager:
    """The lock of the lifecycle's state directory: one wake, sleep, evaluation or intake on it at a time."""
    return exclusive(root / params.lifecycle.state_root, "lifecycle run")


def load_model_ahead(params: Params, root: Path) -> None:
    """Load the project's base model in a process that forks the stages (the stage server): each stage's first
    load of it then takes that copy (``model.decoding.loading.load_ahead``)."""
    load_ahead(params.model, root)


def check_prepare_inputs(cfg: DataConfig, root: Path) -> None:
    """The prepare stage: the source reads and the stream builds (not written), naming the file and the field or row."""
    build_stream(load_source(cfg.source, root), cfg)


def check_wake_inputs(params: Params, root: Path, period: int) -> None:
    """Wake period ``period``: a task of the prepared stream, starting from the previous sleep's state."""
    check_period(root / params.data.out_dir, period)
    if period > 0:
        check_state(params, root, sleep_state_dir(params, root, period - 1),
                    f"wake period {period} starts from the sleep after period {period - 1}; run that sleep first")


def check_sleep_inputs(params: Params, root: Path, period: int, stage: str) -> None:
    """The sleep after ``period`` (``stage`` "dream" starts from the consolidation, anything else from the wake)."""
    check_period(root / params.data.out_dir, period)
    if stage == "dream":
        check_state(params, root, consolidated_state_dir(params, root, period),
                    f"dreaming after period {period} starts from its consolidation; run sleep --stage consolidate first")
    else:
        check_state(params, root, wake_state_dir(params, root, period),
                    f"the sleep after period {period} starts from its wake; run wake --period {period} first")


def check_evaluate_inputs(params: Params, root: Path, period: int) -> None:
    """The evaluation of ``period``: a task of the prepared stream, reading the state after its sleep."""
    check_period(root / params.data.out_dir, period)
    check_state(params, root, sleep_state_dir(params, root, period),
                f"the evaluation of period {period} reads the state after its sleep; run sleep --period {period} first")


__all__ = ["check_evaluate_inputs", "check_prepare_inputs", "check_sleep_inputs", "check_wake_inputs", "lifecycle_lock", "locked"]
