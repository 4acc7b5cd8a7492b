"""Dream trials (dreaming step 4) as Prefect tasks on a task runner: scale-out of a sleep.

Trials are independent and leave the model as it was, so a round's k trials can be
split into groups tried anywhere, given the model state at that point of
:func:`model.sleep.dreaming.dream_about` (the fast expert unlocked for the dreams, the
generator as earlier ReST-EM rounds left it). With ``dream.trial_workers`` N > 1 the
dream stage opens the task runner ``dream.trial_runner`` (by default a local Dask
cluster of N single-threaded worker processes) for its whole duration; every round
sends its trials there as up to N :func:`run_trial_group` tasks. Each group gets the
CMS state as the bytes of a state directory, loads the base model from params,
verifies the checksums and runs :func:`model.sleep.dreaming.try_dreams` on its dreams, so a
worker needs the project and the base model but no shared filesystem. The results
equal the in-process batched pass up to float rounding (tau to ~1e-5).
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import TaskRunner

from model.config import DreamConfig, Params
from model.memory.checkpoint import open_memory_model, save_state
from model.memory.cms import ContinuumMemory
from model.sleep.dreaming import DreamTask, TrialBatch, TrialFn, try_dreams
from model.sleep.trials import TrialResult
from tasks.runners import api_for_workers, task_runner


def state_files(cms: ContinuumMemory) -> dict[str, bytes]:
    """The CMS state as the files of a state directory ({name: bytes}; see model.memory.checkpoint)."""
    with tempfile.TemporaryDirectory(prefix="lm-sleep-state-") as tmp:
        dest = save_state(cms, Path(tmp) / "state")
        return {p.name: p.read_bytes() for p in sorted(dest.iterdir())}


@task(cache_policy=NO_CACHE, persist_result=False)
def run_trial_group(
    params: Params,
    root: Path,
    state: dict[str, bytes],
    cfg: DreamConfig,
    dream_task: DreamTask,
    dreams: list[str],
    seeds: list[int],
) -> list[dict]:
    """Try a group of dreams in isolation on the base model with CMS state ``state``; results as plain dicts.

    The model is loaded here (checksums verified), so the group runs in any process
    that has the project and the base model; it changes nothing outside itself.
    """
    with tempfile.TemporaryDirectory(prefix="lm-sleep-trials-") as tmp:
        for name, data in state.items():
            if Path(name).name != name:
                raise ValueError(f"run_trial_group: state file name {name!r} is not a plain file name")
            (Path(tmp) / name).write_bytes(data)
        loaded, cms, _ = open_memory_model(params, root, tmp)
    results = try_dreams(TrialBatch(loaded.model, loaded.tokenizer, cms, dream_task, cfg, dreams, seeds))
    return [{k: v for k, v in asdict(r).items() if k != "weights"} for r in results]


def split_groups(n: int, groups: int) -> list[range]:
    """0..n-1 as at most ``groups`` contiguous, non-empty ranges whose sizes differ by at most one."""
    groups = max(1, min(groups, n))
    size, extra = divmod(n, groups)
    bounds = [0]
    for g in range(groups):
        bounds.append(bounds[-1] + size + (g < extra))
    return [range(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


@dataclass
class GroupedTrials:
    """A :data:`model.sleep.dreaming.TrialFn` that runs the trials as :func:`run_trial_group` tasks on ``runner``.

    The dreams are split into at most ``groups`` groups; every group starts from a copy
    of the model state at the call (the CMS state; the base weights are frozen and
    loaded from ``params``), so the results equal :func:`model.sleep.dreaming.try_dreams`'s up
    to float rounding.
    """

    runner: TaskRunner
    params: Params
    root: Path
    groups: int

    def __call__(self, batch: TrialBatch) -> list[TrialResult]:
        dreams, seeds = batch.dreams, batch.seeds
        if len(dreams) != len(seeds):
            raise ValueError(f"{len(dreams)} dreams, {len(seeds)} seeds")
        if not dreams:
            return []
        state = state_files(batch.cms)
        submitted = [
            (part, self.runner.submit(run_trial_group, {
                "params": self.params, "root": self.root, "state": state, "cfg": batch.cfg, "dream_task": batch.task,
                "dreams": [dreams[i] for i in part], "seeds": [seeds[i] for i in part],
            }))
            for part in split_groups(len(dreams), self.groups)
        ]
        results = []
        for part, future in submitted:
            got = future.result()
            if len(got) != len(part):
                raise RuntimeError(f"run_trial_group returned {len(got)} results for {len(part)} dreams")
            results += [TrialResult(**{**r, "index": i}) for i, r in zip(part, got)]
        return results


def trial_task_runner(cfg: DreamConfig) -> TaskRunner:
    """A new (not started) instance of ``cfg.trial_runner`` built with ``cfg.trial_runner_kwargs`` (without kwargs,
    the Dask runner is a local cluster of ``cfg.trial_workers`` single-threaded processes: tasks/runners.py)."""
    return task_runner(cfg.trial_runner, cfg.trial_runner_kwargs, cfg.trial_workers, "dream.trial_runner")


@contextlib.contextmanager
def trial_step(params: Params, root: Path) -> Iterator[TrialFn]:
    """The trial step of a dream stage: in this process, or groups on a task runner that lives as long as the stage."""
    cfg = params.dream
    if cfg.trial_workers == 1:
        yield try_dreams
        return
    with api_for_workers(), trial_task_runner(cfg) as runner:
        get_run_logger().info(f"dream trials: up to {cfg.trial_workers} groups per round on {cfg.trial_runner}")
        yield GroupedTrials(runner, params, root, cfg.trial_workers)
