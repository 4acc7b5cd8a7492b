"""Prefect cache keys for the heavy tasks of a cycle: by inputs and code.

A task's key digests the code of ``model/`` and ``tasks/``, the whole params, the
project root, the period, and the SHA-256 of every input the task reads (the stream
file, the manifest of the state it starts from, which itself lists the digests of
the state's tensors). A rerun after a crash thus finds every finished task cached
and resumes at the one that failed; any change of code, params or inputs recomputes.

Results are persisted as JSON (never pickles). A task's files are outputs on disk,
so a cache hit is only used when those files are still there, intact, and the very state
the cached run wrote (:func:`outputs_match`: the result records its state's manifest
digest under :data:`OUTPUT_STATE`); otherwise the task runs again. Without that last
check, params A, then B, then A again in one project would find A's cached result while
the state on disk is B's.

Inside a transaction (a sleep), a task's rollback hook removes its files when a later
task fails. Prefect registers a task's rollback hooks only once the task has succeeded,
so a task that fails half-way through its writes removes them itself
(:func:`writing_outputs`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

from model.config import Params
from model.io import sha256_file
from model.memory.checkpoint import CheckpointError, MANIFEST_FILE, read_manifest

CODE_PACKAGES = ("checks", "model", "reporting", "tasks")


@lru_cache(maxsize=1)
def code_digest() -> str:
    """SHA-256 over the source of every module in ``model/``, ``reporting/`` and ``tasks/`` (path and bytes)."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for pkg in CODE_PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def file_digest(path: Path) -> str:
    """SHA-256 of a file, or ``missing``."""
    return sha256_file(path) if path.is_file() else "missing"


def state_digest(state_dir: Path) -> str:
    """SHA-256 of a state's manifest (which holds the digests of its files), or ``missing``."""
    return file_digest(state_dir / MANIFEST_FILE)


def outputs_intact(state_dir: Path) -> bool:
    """True if ``state_dir`` holds a state whose manifest and files check out."""
    try:
        manifest = read_manifest(state_dir)
    except (CheckpointError, OSError, ValueError):
        return False
    return all((state_dir / name).is_file() and sha256_file(state_dir / name) == digest
               for name, digest in manifest.get("files", {}).items())


#: The key of a heavy task's result that records the SHA-256 of the state manifest it wrote (not a metric).
OUTPUT_STATE = "output_state"


def stamp_output(result: dict[str, Any], state_dir: Path) -> dict[str, Any]:
    """``result`` with the digest of the state it wrote (:data:`OUTPUT_STATE`)."""
    return {**result, OUTPUT_STATE: state_digest(state_dir)}


def outputs_match(result: dict[str, Any] | None, state_dir: Path) -> bool:
    """True if ``state_dir`` is intact and is the state that the run which returned ``result`` wrote."""
    return (isinstance(result, dict) and outputs_intact(state_dir)
            and result.get(OUTPUT_STATE) == state_digest(state_dir))


def cache_key(task_name: str, params: Params, root: Path, period: int, inputs: list[Path]) -> str:
    """The cache key of one task run (hex)."""
    doc: dict[str, Any] = {
        "task": task_name,
        "code": code_digest(),
        "params": params.model_dump(mode="json"),
        "root": str(Path(root).resolve()),
        "period": period,
        "inputs": {str(p): state_digest(p) if p.is_dir() or not p.suffix else file_digest(p) for p in inputs},
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def cache_options(inputs: Any) -> dict[str, Any]:
    """``@task`` options that cache a ``(params, root, ..., period)`` task by inputs and code.

    ``inputs(params, root, period)`` lists the files and state directories the task reads.
    """

    def key(context: Any, parameters: dict[str, Any]) -> str:
        params, root, period = parameters["params"], Path(parameters["root"]), int(parameters["period"])
        return cache_key(context.task.name, params, root, period, inputs(params, root, period))

    return {"cache_key_fn": key, "persist_result": True, "result_serializer": "json"}


def record_outputs(*paths: Path) -> None:
    """Note, in the running task's transaction, the files it is about to write (for its rollback hook)."""
    from prefect.transactions import get_transaction

    txn = get_transaction()
    if txn is not None:
        txn.set("outputs", [str(p) for p in paths])


def _remove(paths: list[Path]) -> None:
    for p in paths:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


@contextlib.contextmanager
def writing_outputs(*paths: Path) -> Iterator[None]:
    """The block writes ``paths`` (files or directories): recorded for the task's rollback hook,
    and removed at once if the block itself fails, so a failed task leaves none of them."""
    record_outputs(*paths)
    try:
        yield
    except BaseException:
        _remove(list(paths))
        raise


def remove_outputs(transaction: Any) -> None:
    """Rollback hook body: delete the files a task recorded with :func:`record_outputs`."""
    _remove([Path(p) for p in transaction.get("outputs", [])])
