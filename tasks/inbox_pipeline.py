"""The inbox periods as a DVC pipeline (docs/design.md §4): ``pipelines/inbox/dvc.yaml``, one stage per
finished inbox period, written from the ledger and committed to DVC (the Prefect task :func:`track_period`).

A stage's deps are the batches the ledger says its period consumed, the state it started from, the prepared
stream, the code an inbox period runs (:data:`INBOX_CODE`) and the params sections it reads
(:data:`INBOX_PARAMS`); its outs are what the period wrote (:func:`period_outputs`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from model.config import Params
from model.data.intake import LEDGER_FILE, Ledger, read_ledger
from model.data.stream import PLAN_FILE, DataError
from model.io import write_text
from tasks.intake import inbox_dir, period_files


#: The DVC pipeline of the inbox periods, beside the project's dvc.yaml (git-tracked, like it).
INBOX_PIPELINE = Path("pipelines/inbox/dvc.yaml")
#: The code an inbox period runs: a change to it makes every period's stage stale, as in dvc.yaml.
INBOX_CODE = (
    "flows/intake.py", "flows/wake.py", "flows/sleep.py", "flows/evaluate.py", "tasks/intake.py",
    "tasks/inbox_pipeline.py", "tasks/wake.py", "tasks/sleep.py", "tasks/dream.py", "tasks/guards.py", "tasks/trials.py",
    "tasks/evaluate.py", "tasks/caching.py", "tasks/prepare.py", "checks", "reporting/common.py", "model/config",
    "model/data", "model/memory", "model/sleep", "model/decoding", "model/evaluation", "model/io.py",
)
#: The params sections an inbox period reads.
INBOX_PARAMS = ("seed", "model", "cms", "wake", "sampling", "consolidation", "dream", "lifecycle", "intake")


def period_outputs(params: Params, root: Path, period: int) -> tuple[list[Path], list[Path]]:
    """What inbox period ``period`` writes: (cached outputs: its states and dream tables; uncached: its
    reports and metrics), those that exist."""
    from tasks.wake import timings_path

    report = root / params.dream.reports_dir / f"period-{period}"
    cached = [p for p in period_files(params, root, period) if p != report and p.exists()]
    uncached = [report,
                *(root / d / f"period-{period}.json" for d in (params.wake.metrics_dir, params.consolidation.metrics_dir,
                                                                params.dream.metrics_dir, params.lifecycle.metrics_dir)),
                *(timings_path(params, root, s, period) for s in ("wake", "consolidation", "dreaming"))]
    return cached, [p for p in uncached if p.exists()]


def inbox_pipeline(params: Params, root: Path, ledger: Ledger) -> dict[str, Any]:
    """The DVC pipeline of every finished inbox period (``pipelines/inbox/dvc.yaml``): one stage per period, whose
    deps are the batches the ledger says it consumed, the state it started from, the prepared stream and the code,
    and whose outs are what it wrote. ``dvc repro`` of a stage replays the period in place (``lm-sleep replay``)."""
    import os

    from tasks.wake import sleep_state_dir

    import yaml

    pipe_dir = root / INBOX_PIPELINE.parent
    given = yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8")) if (root / "params.yaml").is_file() else {}
    sections = [k for k in INBOX_PARAMS if k in (given or {})]  # DVC compares the sections the file sets
    rel = lambda p: Path(os.path.relpath(p, root)).as_posix()  # noqa: E731 (paths relative to the stage's wdir)
    inbox = inbox_dir(params, root)
    prepared = root / params.data.out_dir
    stages: dict[str, Any] = {}
    for entry in ledger.periods:
        if entry["status"] != "done":
            continue
        n = entry["period"]
        before = sleep_state_dir(params, root, n - 1)
        deps = [*INBOX_CODE, *(rel(inbox / ledger.batch(b)["file"]) for b in entry["batches"])]
        deps += [rel(prepared)] if (prepared / PLAN_FILE).is_file() else []
        deps += [rel(before)] if n > 0 else []
        cached, uncached = period_outputs(params, root, n)
        stages[f"period-{n}"] = {
            "cmd": f"python -m flows.stage intake --params params.yaml --period {n}",
            "wdir": Path(os.path.relpath(root, pipe_dir)).as_posix(),
            "deps": deps,
            "params": sections,
            "outs": [rel(p) for p in cached] + [{rel(p): {"cache": False}} for p in uncached],
        }
    return {"stages": stages}


@task(cache_policy=NO_CACHE)
def track_period(params: Params, root: Path, period: int) -> str | None:
    """Version finished inbox period ``period`` with DVC: rewrite the inbox pipeline from the ledger, then
    ``dvc commit`` its stage (hashes into ``pipelines/inbox/dvc.lock``, outputs into the DVC cache). Skipped
    (None) when the project is not a DVC repository; a DVC failure is an error naming the stage."""
    import subprocess
    import sys

    import yaml

    if not (root / ".dvc").is_dir():
        return None
    if (root / "dvc.yaml").is_file() and period in {c.period for c in params.lifecycle.cycles}:
        get_run_logger().warning(
            f"inbox period {period}: not versioned by DVC: its states are also outputs of dvc.yaml's cycle "
            f"{period} (the inbox started without the prepared stream); `lm-sleep rebuild` still rebuilds it")
        return None
    ledger = read_ledger(inbox_dir(params, root) / LEDGER_FILE)
    header = ("# Written by lm-sleep from the inbox ledger after each finished inbox period; do not edit.\n"
              "# `dvc repro pipelines/inbox/dvc.yaml:period-N` replays period N in place from the batches it consumed.\n")
    write_text(root / INBOX_PIPELINE, header + yaml.safe_dump(inbox_pipeline(params, root, ledger), sort_keys=False))
    target = f"{INBOX_PIPELINE.as_posix()}:period-{period}"
    done = subprocess.run([sys.executable, "-m", "dvc", "commit", "--force", "--quiet", target], cwd=root,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        raise DataError(f"{root / INBOX_PIPELINE}: dvc commit of stage period-{period} failed: "
                        f"{done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.returncode}")
    get_run_logger().info(f"inbox period {period}: versioned by DVC ({target})")
    return target
