"""Training the dream policy by ReST-EM over rounds on a pool of passages (issue #14; docs/design.md §3).

SEAL's outer loop, on the policy of model/sleep/dream_policy.py. One round r = 0..R-1 is:

1. *E-step*: the current policy dreams m times about every training passage (dream mode,
   as a sleep samples); every non-empty dream is tried in isolation (a fresh LoRA on that
   dream alone, :func:`model.sleep.dreaming.try_dreams`) and rewarded 1 if it raised the
   passage's tau (mean gold-answer log-likelihood per token, questions asked without C).
2. *M-step*: the policy is fine-tuned on the round's rewarded (dream prompt -> dream) pairs
   (:func:`model.sleep.dream_policy.rest_em_update`, ``steps`` steps on minibatches of ``batch_size``).

Every round is measured before its update (round 0 is the untrained policy) and once more
after the last update, so R rounds give R + 1 measurements; with ``eval_tasks`` the same
measurement runs, policy frozen, on passages it never trains on. Per measurement
(:class:`RoundStats`): the share of rewarded dreams, the mean tau gain of a trial and the
tokens generated. The memory levels stay as the caller gave them (a fresh state); only the
policy learns.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from model.config import DreamConfig, PolicyTrainingConfig, SamplingConfig
from model.memory.cms import ContinuumMemory
from model.sleep.dream_policy import DreamPolicy, rest_em_update
from model.sleep.dreaming import DreamTask, TrialBatch, TrialFn, generate_dreams, try_dreams


@dataclass
class RoundStats:
    """One measurement of the policy on a set of passages (``split``: train or eval)."""

    round: int  # ReST-EM updates the policy had when it dreamt these
    split: str
    passages: int
    dreams: int  # non-empty dreams, all tried
    rewarded: int
    share_rewarded: float
    mean_tau_gain: float  # mean over tried dreams of tau after the trial - tau before
    tokens: int  # dream tokens generated
    seconds: float
    update_loss: list[float] | None = None  # the M-step that followed (train split; None after the last round)

    def to_dict(self) -> dict:
        return asdict(self)


def measure_round(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    cms: ContinuumMemory,
    tasks: Sequence[DreamTask],
    cfg: DreamConfig,
    round_: int,
    split: str,
    seed: int,
    sampling: SamplingConfig | None = None,
    trial_fn: TrialFn = try_dreams,
    on_passage: Callable[[str, int, int], None] | None = None,
) -> tuple[RoundStats, list[tuple[str, str]]]:
    """The E-step: every task's dreams from the current policy, each tried; returns the stats and the rewarded
    (prompt, dream) pairs. The sampling seeds depend on ``seed``, the round and the task, not on the split's size.
    ``on_passage(split, done, total)`` is called after each task (progress)."""
    start = time.perf_counter()
    n_dreams = n_rewarded = tokens = 0
    gains: list[float] = []
    pairs: list[tuple[str, str]] = []
    for j, task in enumerate(tasks):
        s = seed * 7_919 + round_ * 1_009 + j
        prompt, dreams = generate_dreams(model, tokenizer, cms, task, cfg, s, sampling)
        tokens += sum(len(tokenizer(d, add_special_tokens=False)["input_ids"]) for d in dreams)
        tried = [d for d in dreams if d]
        if not tried:
            if on_passage is not None:
                on_passage(split, j + 1, len(tasks))
            continue
        results = trial_fn(TrialBatch(model, tokenizer, cms, task, cfg, tried, [s * 31 + i for i in range(len(tried))]))
        for d, res in zip(tried, results):
            if res.error is not None or res.tau_after is None:
                continue
            n_dreams += 1
            gains.append(float(res.tau_after - res.tau_before))
            if res.reward == 1:
                n_rewarded += 1
                pairs.append((prompt, d))
        if on_passage is not None:
            on_passage(split, j + 1, len(tasks))
    stats = RoundStats(round_, split, len(tasks), n_dreams, n_rewarded,
                       n_rewarded / n_dreams if n_dreams else math.nan,
                       sum(gains) / len(gains) if gains else math.nan, tokens, round(time.perf_counter() - start, 2))
    return stats, pairs


def train_policy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    cms: ContinuumMemory,
    train_tasks: Sequence[DreamTask],
    eval_tasks: Sequence[DreamTask],
    cfg: DreamConfig,
    training: PolicyTrainingConfig,
    seed: int,
    start_round: int = 0,
    on_round: Callable[[int, list[RoundStats]], None] | None = None,
    sampling: SamplingConfig | None = None,
    trial_fn: TrialFn = try_dreams,
    on_passage: Callable[[str, int, int], None] | None = None,
) -> list[RoundStats]:
    """R ReST-EM rounds on ``train_tasks`` (see the module docstring); returns the stats of the rounds run here.

    ``cms.dream_policy`` must be attached; it is the only thing trained. With ``start_round`` = k the
    policy must be the one after k updates (a resumed run). ``on_round(k, stats)`` is called after
    measurement k (and, for k < R, the update that follows it), to persist the policy and the stats;
    ``on_passage`` after every passage dreamt about (progress, :func:`measure_round`).
    """
    policy: DreamPolicy | None = cms.dream_policy
    if policy is None:
        raise ValueError("train_policy needs the dream policy attached (dream.policy.enabled)")
    if not cfg.policy.enabled:
        raise ValueError("train_policy trains the dream policy: dream.policy.enabled must be true")
    if not train_tasks:
        raise ValueError("train_policy: no training passages")
    out: list[RoundStats] = []
    for r in range(start_round, training.rounds + 1):
        stats, pairs = measure_round(model, tokenizer, cms, train_tasks, cfg, r, "train", seed, sampling, trial_fn,
                                     on_passage)
        measured = [stats]
        if eval_tasks:
            ev, _ = measure_round(model, tokenizer, cms, eval_tasks, cfg, r, "eval", seed + 1, sampling, trial_fn,
                                  on_passage)
            measured.append(ev)
        if r < training.rounds:
            stats.update_loss = rest_em_update(model, tokenizer, policy, [p for p, _ in pairs], [d for _, d in pairs],
                                               training.steps, cfg.max_length, origin=f"policy training round {r}",
                                               batch_size=training.batch_size, seed=seed * 31 + r)
            if not pairs:  # nothing rewarded: the policy is as it was, but the round counts
                policy.rounds += 1
                policy.history.append(f"policy training round {r}: no rewarded dream")
        out += measured
        if on_round is not None:
            on_round(r, measured)
    return out


__all__ = ["RoundStats", "measure_round", "train_policy"]
