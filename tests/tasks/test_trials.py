"""Dream trials in groups (tasks/trials.py): splitting, the task runner from params, the state a group sees."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from model.config import DreamConfig, Params
from model.memory.checkpoint import open_memory_model
from model.sleep.dreaming import TrialBatch, task_from_examples, try_dreams
from tasks.trials import GroupedTrials, run_trial_group, split_groups, trial_task_runner
from tests.model.helpers import make_nonzero, tiny_cms_config

TOL = dict(rtol=1e-4, atol=1e-5)  # batched vs split groups (tests/model/test_trials.py)
DREAMS = ["please money money now", "the alarm rings at six", "rain rain tomorrow", "play a song now"]
SEEDS = [5, 6, 7, 8]


def test_split_groups_are_contiguous_balanced_and_never_empty():
    assert split_groups(3, 2) == [range(0, 2), range(2, 3)]
    assert split_groups(7, 3) == [range(0, 3), range(3, 5), range(5, 7)]
    assert split_groups(2, 8) == [range(0, 1), range(1, 2)]
    assert split_groups(5, 1) == [range(0, 5)]
    assert split_groups(0, 3) == []


def test_trial_task_runner_comes_from_params():
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    runner = trial_task_runner(DreamConfig(trial_workers=3))
    assert isinstance(runner, DaskTaskRunner)
    assert runner.cluster_kwargs == {"n_workers": 3, "threads_per_worker": 1, "processes": True}
    assert trial_task_runner(DreamConfig(trial_workers=2, trial_runner_kwargs={"address": "tcp://h:8786"})).address == "tcp://h:8786"
    threads = trial_task_runner(DreamConfig(trial_runner="prefect.task_runners.ThreadPoolTaskRunner",
                                            trial_runner_kwargs={"max_workers": 2}))
    assert isinstance(threads, ThreadPoolTaskRunner) and threads._max_workers == 2
    with pytest.raises(ValueError, match="cannot import 'prefect_nowhere.Runner'"):
        trial_task_runner(DreamConfig(trial_runner="prefect_nowhere.Runner"))
    with pytest.raises(ValueError, match="not a Prefect task runner"):
        trial_task_runner(DreamConfig(trial_runner="collections.OrderedDict"))
    with pytest.raises(ValidationError, match="trial_runner"):
        DreamConfig(trial_runner="DaskTaskRunner")
    with pytest.raises(ValidationError, match="trial_workers"):
        DreamConfig(trial_workers=0)


@dataclass
class _Done:
    value: list[dict]

    def result(self) -> list[dict]:
        return self.value


class InlineRunner:
    """Stands in for a task runner: runs each submitted task's function at once, recording the calls."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def submit(self, task, parameters: dict) -> _Done:
        self.calls.append(parameters)
        return _Done(task.fn(**parameters))


def test_groups_load_the_in_memory_state_and_equal_the_batched_pass(tmp_path: Path):
    params = Params(model={"source": "tiny"}, cms=tiny_cms_config(), dream=DreamConfig(
        trial_steps=2, trial_lr=0.05, lora_r=4, lora_alpha=8.0, max_length=96, chat=False))
    loaded, cms, _ = open_memory_model(params)
    cms.unlock(0, "dream@period-0")
    make_nonzero(cms, 0)  # the state in memory differs from a fresh one: a group must see this one
    task = task_from_examples([("please money money now", "balance"), ("wake me at six", "alarm")],
                              [("money money please", "balance"), ("an alarm at five", "alarm")],
                              "{text} -> {label}", "t0", params.dream)
    batch = TrialBatch(loaded.model, loaded.tokenizer, cms, task, params.dream, DREAMS, SEEDS)
    batched = try_dreams(batch)

    runner = InlineRunner()
    grouped = GroupedTrials(runner, params, tmp_path, groups=3)(batch)
    assert [c["dreams"] for c in runner.calls] == [DREAMS[:2], DREAMS[2:3], DREAMS[3:]]
    assert [c["seeds"] for c in runner.calls] == [SEEDS[:2], SEEDS[2:3], SEEDS[3:]]
    assert [r.index for r in grouped] == [0, 1, 2, 3]
    for got, want in zip(grouped, batched):
        assert (got.reward, got.improved, got.error) == (want.reward, want.improved, want.error)
        torch.testing.assert_close(got.tau_before, want.tau_before, **TOL)
        torch.testing.assert_close(got.tau_after, want.tau_after, **TOL)
        torch.testing.assert_close(torch.tensor(got.losses), torch.tensor(want.losses), **TOL)
    # A fresh model (no fast expert) measures another tau: the groups did load the state in memory.
    fresh, fresh_cms, _ = open_memory_model(params)
    fresh_tau = try_dreams(TrialBatch(fresh.model, fresh.tokenizer, fresh_cms, task, params.dream, DREAMS[:1],
                                      SEEDS[:1]))[0].tau_before
    assert abs(fresh_tau - batched[0].tau_before) > 1e-3


def test_a_group_refuses_state_file_names_that_leave_its_directory(tmp_path: Path):
    params = Params(model={"source": "tiny"}, cms=tiny_cms_config())
    task = task_from_examples([("a", "b")], [("c", "b")], "{text} -> {label}", "t0", params.dream)
    with pytest.raises(ValueError, match="not a plain file name"):
        run_trial_group.fn(params, tmp_path, {"../manifest.json": b"{}"}, params.dream, task, ["x"], [1])
