"""Prefect task that publishes a cycle to the artifact store (thin: the store is the ``store`` package).

What a cycle publishes, under ``runs/<RUN_ID>/cycle-<N>/``:

    experts/manifest.json, experts/experts.safetensors   the state after the sleep (with provenance)
    dreams/consolidation.parquet                          the sleep's distillation and imitation data
    dreams/dreams.parquet, dreams/promoted.parquet        every dream (scores, reward, gate) and the promoted ones
    reports/gate/...                                      the Great Expectations gate report of the dreams
    reports/metrics/{wake,consolidation,dreaming,cycle}.json
    reports/lifecycle/...                                 the lifecycle report and plots: with the last
                                                          evaluated cycle only (see :func:`cycle_files`)
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from model.config import Params
from model.memory.checkpoint import EXPERTS_FILE, MANIFEST_FILE, read_manifest
from reporting import REPORT_DIR
from store import experts_from_manifest, publish_cycle_from_env
from tasks.store import run_logger
from tasks.wake import sleep_state_dir

RUN_ID_ENV = "LM_SLEEP_RUN_ID"


def default_run_id(params: Params) -> str:
    """``$LM_SLEEP_RUN_ID``, else ``lifecycle.run_id``, else ``lifecycle-<10 hex of the params' digest>``.

    The default is stable: rerunning the same params publishes to the same run (uploads
    of unchanged files are skipped), while changed params give a new run.
    """
    if os.environ.get(RUN_ID_ENV):
        return os.environ[RUN_ID_ENV]
    if params.lifecycle.run_id:
        return params.lifecycle.run_id
    digest = hashlib.sha256(json.dumps(params.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()
    return f"lifecycle-{digest[:10]}"


def last_evaluated(params: Params, root: Path) -> int | None:
    """The last period of the prepared stream with an evaluated cycle (the run's ``period-N.json``), or None."""
    last = None
    for period in range(params.data.n_tasks):
        if not (root / params.lifecycle.metrics_dir / f"period-{period}.json").is_file():
            break
        last = period
    return last


def cycle_files(params: Params, root: Path, period: int) -> dict[str, Path]:
    """Key suffix -> local file or directory, for the artifacts of ``period`` that exist.

    ``reports/lifecycle`` holds one report, rewritten over the whole run, so it goes only with
    the last evaluated cycle: publishing an earlier cycle again (a rerun of a finished
    lifecycle, ``lm-sleep publish``) then sends the same objects as its first publish, not
    the final report under that cycle.
    """
    state = sleep_state_dir(params, root, period)
    candidates = {
        "experts/manifest.json": state / MANIFEST_FILE,
        "experts/experts.safetensors": state / EXPERTS_FILE,
        "dreams/consolidation.parquet": root / params.consolidation.dreams_dir / f"period-{period}.parquet",
        "dreams/dreams.parquet": root / params.dream.dreams_dir / f"period-{period}-dreams.parquet",
        "dreams/promoted.parquet": root / params.dream.dreams_dir / f"period-{period}-promoted.parquet",
        "reports/gate": root / params.dream.reports_dir / f"period-{period}",
        "reports/metrics/wake.json": root / params.wake.metrics_dir / f"period-{period}.json",
        "reports/metrics/consolidation.json": root / params.consolidation.metrics_dir / f"period-{period}.json",
        "reports/metrics/dreaming.json": root / params.dream.metrics_dir / f"period-{period}.json",
        "reports/metrics/cycle.json": root / params.lifecycle.metrics_dir / f"period-{period}.json",
        "reports/lifecycle": root / REPORT_DIR,
    }
    if period != last_evaluated(params, root):
        del candidates["reports/lifecycle"]
    return {k: p for k, p in candidates.items() if p.exists()}


def cycle_summary(params: Params, root: Path, period: int) -> dict[str, Any]:
    """The cycle's row (see ``tasks.evaluate.cycle_row``) plus every expert with its provenance."""
    row = json.loads((root / params.lifecycle.metrics_dir / f"period-{period}.json").read_text())
    return {**row, "experts": experts_from_manifest(read_manifest(sleep_state_dir(params, root, period)))}


@task(cache_policy=NO_CACHE)
def publish_cycle_artifacts(params: Params, root: Path, period: int, run_id: str) -> dict[str, Any]:
    """Publish one evaluated cycle; a store failure is logged and the files stay queued for the next run."""
    return publish_cycle_from_env(root, run_id, period, cycle_files(params, root, period),
                                  cycle_summary(params, root, period), log=run_logger())
