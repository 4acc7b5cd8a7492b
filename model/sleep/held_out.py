"""The dream stage's keep-or-undo check (docs/design.md §3, step 6): a check set scored before the stage
and after promotion; the training is kept only if it helped (:func:`training_helped`).

On the stream each held-out (text, label) is scored among the labels seen so far as evaluation scores it
(:func:`held_out_check`, :func:`candidate_check`); on passages the check is tau over the tasks'
questions (:func:`answer_check`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from model.decoding.forward import TrunkCache
from model.memory.cms import ContinuumMemory
from model.memory.routed import routed_scores
from model.sleep.dreaming import DreamTask
from model.sleep.trial_lora import AnswerLoglik


@dataclass(frozen=True)
class HeldOutScore:
    """How well a state answers the sleep's check set.

    ``logprob``: mean log-probability of the gold answer (higher is better); on the
    stream it is normalised over the candidate labels (the labels seen so far), so it
    measures telling labels apart, not making label words likelier. ``accuracy``: share of
    check inputs whose best candidate is the gold one (NaN where there are no candidates).
    """

    logprob: float
    accuracy: float
    n: int


def candidate_check(scores: torch.Tensor, gold: torch.Tensor) -> HeldOutScore:
    """Score of label log-likelihoods ``scores`` (N, C) against gold indices ``gold`` (N,).

    logprob = mean_i log softmax(scores_i)[gold_i]; accuracy = mean_i [argmax scores_i = gold_i].
    """
    if scores.ndim != 2 or gold.shape != (scores.shape[0],) or scores.shape[0] == 0:
        raise ValueError(f"candidate_check: scores {tuple(scores.shape)} and gold {tuple(gold.shape)} do not match")
    logp = torch.log_softmax(scores.float(), dim=1).gather(1, gold.view(-1, 1)).squeeze(1)
    acc = (scores.argmax(dim=1) == gold).float().mean()
    return HeldOutScore(float(logp.mean()), float(acc), int(scores.shape[0]))


@torch.no_grad()
def held_out_check(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    cms: ContinuumMemory,
    template: str,
    examples: Sequence[tuple[str, str]],
    candidates: Sequence[str],
    batch_size: int,
    max_length: int,
    trunk: TrunkCache | None = None,
) -> HeldOutScore:
    """Stream check: each (text, label) scored among ``candidates`` as evaluation scores it (prototype routing).

    ``trunk``: one :class:`~model.decoding.forward.TrunkCache` for the check before and after the dream
    training (which trains only memory levels above it), so the second check runs the layers below the
    first CMS layer not again."""
    index = {c: i for i, c in enumerate(candidates)}
    missing = sorted({y for _, y in examples} - index.keys())
    if missing:
        raise ValueError(f"held-out check: labels {missing} are not among the candidate labels")
    scores, _ = routed_scores(model, tokenizer, cms, template, [x for x, _ in examples], list(candidates),
                              batch_size, max_length, trunk=trunk)
    return candidate_check(scores, torch.tensor([index[y] for _, y in examples]))


@torch.no_grad()
def answer_check(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, tasks: Sequence[DreamTask],
                 max_length: int) -> HeldOutScore:
    """Passage check: tau (mean answer log-likelihood per token) over every task's questions; no accuracy."""
    prompts = [p for t in tasks for p in t.tau_prompts]
    answers = [a for t in tasks for a in t.tau_answers]
    tau = AnswerLoglik(model, tokenizer, prompts, answers, max_length)(None)
    return HeldOutScore(float(tau[0]), math.nan, len(prompts))


def training_helped(before: HeldOutScore, after: HeldOutScore) -> bool:
    """Keep the dream stage's training: the check set's log-probability rose and its accuracy did not fall."""
    return after.logprob > before.logprob and _accuracy_held(before, after)


def nothing_lost(before: HeldOutScore, after: HeldOutScore) -> bool:
    """Keep a change that was not meant to help a check set (``dream.check_merged_periods``: the earlier periods a
    dream stage's merge touched): its log-probability and accuracy did not fall."""
    return after.logprob >= before.logprob and _accuracy_held(before, after)


def _accuracy_held(before: HeldOutScore, after: HeldOutScore) -> bool:
    """The check's accuracy did not fall (passages have none: NaN holds)."""
    return math.isnan(before.accuracy) or after.accuracy >= before.accuracy
