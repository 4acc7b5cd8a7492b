"""Knowledge incorporation: ways to learn a SQuAD passage, and no-context QA after it (docs/design.md §5).

Issue #6 compares, on SEAL's SQuAD subsets, four methods that each learn a passage C
into the fast CMS level (the same parameters, the same promotion budget):

* :func:`learn_base` (``base``): nothing is trained.
* :func:`learn_passage_finetune` (``passage_finetune``): SFT on the passage text itself,
  in pieces that fit the window, ``dream.promote_steps`` steps.
* :func:`learn_base_dreams` (``base_dreams``): m dreams sampled from the base model (all
  memory levels masked, no random-expert mode), every non-empty one trained in with the
  promotion's steps: no importance selection, no isolated trials, no ReST-EM, no gate
  (SEAL without its RL loop).
* :func:`learn_sleep` (``sleep``): the dream stage as the lifecycle's dream task runs it:
  :func:`model.sleep.dreaming.dream_about` (dream mode, selection, trials, ReST-EM into the
  fast level), the gate, then promotion. The gate is a Great Expectations suite, which
  ``model/`` does not import: the caller passes it in (:class:`GateFn`).

Issue #14's methods put dreams on top of the wake that read the passage (a sleep follows a wake):

* :func:`learn_passage_dreams` (``passage_dreams``): passage fine-tuning, then every dream of the
  dream policy trained in (SEAL's "passage + synthetic data", no selection, trials or gate).
* :func:`learn_passage_sleep` (``passage_sleep``, ``passage_sleep_trained``): passage fine-tuning,
  then the full dream stage; the policy is the state's, untrained or trained beforehand
  (model/sleep/policy_training.py), the same for every passage (:class:`MemorySnapshot` restores it).

Two modes (:func:`run_single`, :func:`run_continued`): *single* (n=1) learns every
passage from the same fresh state (:class:`MemorySnapshot`) and answers its questions
right after; *continued* (continued pretraining) lets one state learn the passages one
after the other and answers every passage's questions at the end. Measures
(:func:`evaluate_passage`): exact match and token F1 of greedy no-context answers
(:mod:`model.evaluation.grading`) and tau, the mean gold-answer log-likelihood per token.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager as ContextManager
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from model.config import DreamConfig, SamplingConfig
from model.evaluation.grading import exact_match, token_f1
from model.evaluation.knowledge import Passage, answer_questions, passage_chunks
from model.memory.cms import ContinuumMemory
from model.memory.routed import map_routed
from model.sleep.dream_checks import add_check_columns
from model.sleep.dreaming import (
    DreamTask,
    dream_about,
    fast_parameters,
    generate_dreams,
    promote,
    train_prompt,
)
from model.sleep.sft import train_on_pairs
from model.sleep.trial_lora import AnswerLoglik

#: Methods whose dreams come from a policy trained beforehand by ReST-EM (model/sleep/policy_training.py).
TRAINED_POLICY_METHODS = frozenset({"passage_sleep_trained"})
MEASURES = ("em", "f1", "tau")
#: The gate of the sleep method: the dream table (with the check columns) -> the same rows with a
#: boolean ``promoted`` column (and whatever else the gate adds: ``gate_passed``, ``failed_checks``).
GateFn = Callable[[pd.DataFrame], pd.DataFrame]


@dataclass
class Learned:
    """What one method did to learn one passage: its training losses and, for dreams, the funnel."""

    losses: list[float] = field(default_factory=list)
    gradient_steps: int = 0
    n_dreams: int = 0
    funnel: dict[str, int] | None = None
    dreams: pd.DataFrame | None = None  # the dream table (sleep: gated; base_dreams: text only)
    dream_tokens: int = 0  # tokens of the dreams trained in (what "teaches per training token" divides by)


class MemorySnapshot:
    """A copy of every memory parameter and expert record (and of the dream policy), to start each passage from
    the same state."""

    def __init__(self, cms: ContinuumMemory) -> None:
        self.tensors = {n: p.detach().clone() for n, p in cms.named_memory_parameters()}
        self.experts = copy.deepcopy(cms.experts)
        self.step = cms.step
        policy = cms.dream_policy
        self.policy = (policy.snapshot(), policy.rounds, list(policy.history)) if policy is not None else None

    def restore(self, cms: ContinuumMemory) -> None:
        """Put ``cms`` back into the snapshot's state (weights, active experts, routing, step)."""
        with torch.no_grad():
            for n, p in cms.named_memory_parameters():
                p.copy_(self.tensors[n])
                p.grad = None
        cms.experts = copy.deepcopy(self.experts)
        for li in range(cms.n_levels):
            cms.refresh_routing(li)
        cms.step = self.step
        if self.policy is not None:  # the same dream policy for every passage (frozen across passages)
            cms.dream_policy.restore(self.policy[0])
            cms.dream_policy.rounds, cms.dream_policy.history = self.policy[1], list(self.policy[2])


def fresh_fast_expert(cms: ContinuumMemory, origin: str = "knowledge") -> int:
    """Empty the fast level and unlock one fresh expert (B = 0: the output is the base model's), as after
    a consolidation; every method trains this expert. Returns its slot."""
    cms.reset_level(0, reason="knowledge")
    return cms.unlock(0, origin=origin)


def evaluate_passage(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, passage: Passage, task: DreamTask, cfg: DreamConfig,
    routes: Sequence[int] | None = None, view: Callable[[int], ContextManager[None]] | None = None,
) -> dict[str, Any]:
    """No-context QA on the passage's questions: mean exact match, mean token F1, tau, and the answers.

    Answers are greedy, asked with ``cfg.qa_template`` and no passage; tau is the mean
    log-likelihood per gold-answer token (pooled over the questions, always <= 0). With ``routes``
    (each question's routed period) every question is answered, and its tau measured, inside
    ``view(period)`` (model/memory/passage_experts.py: passage_view).
    """
    questions = [q.question for q in passage.questions]
    golds = [q.answer for q in passage.questions]
    measure = AnswerLoglik(model, tokenizer, list(task.tau_prompts), list(task.tau_answers), cfg.max_length)
    if routes is None:
        preds = answer_questions(model, tokenizer, questions, cfg.qa_template)
    else:
        if view is None or len(routes) != len(questions):
            raise ValueError(f"evaluate_passage: {len(routes)} routes for {len(questions)} questions"
                             + ("" if view is not None else ", and no view to answer them in"))
        preds = map_routed(None, routes, questions,
                           lambda part: answer_questions(model, tokenizer, part, cfg.qa_template), view)
    return {
        "em": sum(exact_match(p, g) for p, g in zip(preds, golds)) / len(golds),
        "f1": sum(token_f1(p, g) for p, g in zip(preds, golds)) / len(golds),
        "tau": routed_tau(measure, routes, view),
        "answers": preds,
    }


def routed_tau(measure: AnswerLoglik, routes: Sequence[int] | None = None,
               view: Callable[[int], ContextManager[None]] | None = None) -> float:
    """tau of ``measure``'s pairs, pooled over their answer tokens; with ``routes`` (one period per pair) each pair's
    log-likelihood is taken inside ``view(period)``."""
    if routes is None:
        logp, n = measure.per_example()
        return float(logp.sum() / n.sum())
    if view is None:
        raise ValueError("routed_tau: routes without a view to measure them in")

    def pairs(part: list[int]) -> list[tuple[float, float]]:
        logp, n = measure.per_example()  # every pair in this view; the part routed here is kept
        return [(float(logp[i]), float(n[i])) for i in part]

    kept = map_routed(None, routes, list(range(len(routes))), pairs, view)
    return sum(lp for lp, _ in kept) / sum(n for _, n in kept)


@dataclass(frozen=True)
class Reader:
    """What learns one passage: the model with its memory, the dream stage's settings, the passage's sampling seed and,
    for the methods that gate dreams, the gate."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    cms: ContinuumMemory
    cfg: DreamConfig
    seed: int = 0
    gate: GateFn | None = None
    sampling: SamplingConfig | None = None


def learn_base(r: Reader, task: DreamTask) -> Learned:
    """``base``: learn nothing (the reference every gain is measured against)."""
    return Learned()


def learn_passage_finetune(r: Reader, task: DreamTask, origin: str = "passage-ft") -> Learned:
    """``passage_finetune``: SFT of the fast level on the passage text after the train prompt.

    A passage longer than the window is cut into pieces at sentence ends
    (:func:`model.evaluation.knowledge.passage_chunks`); all pieces form one batch trained for
    ``cfg.promote_steps`` steps at ``cfg.lr``, the budget promotion gets.
    """
    cfg = r.cfg
    prompt = train_prompt(task, cfg)
    room = cfg.max_length - len(r.tokenizer(prompt)["input_ids"]) - 1  # prompt + piece + EOS fit the window
    pieces = passage_chunks(r.tokenizer, task.context, room)
    losses = train_on_pairs(r.model, r.tokenizer, fast_parameters(r.cms, origin), [prompt] * len(pieces), pieces,
                            cfg.promote_steps, cfg.lr, cfg.max_length)
    return Learned(losses=losses, gradient_steps=len(losses))


def learn_base_dreams(r: Reader, task: DreamTask) -> Learned:
    """``base_dreams``: m dreams from the base model, every non-empty one trained in (no selection, no RL).

    Dreams are sampled with every memory level masked (the base model, whatever the
    state has learned) and without the random-expert dream mode; all of them are
    trained into the fast level with :func:`model.sleep.dreaming.promote`.
    """
    plain = r.cfg.model_copy(update={"random_expert": False})
    with r.cms.levels_masked(list(range(r.cms.n_levels))):
        _, dreams = generate_dreams(r.model, r.tokenizer, r.cms, task, plain, r.seed, r.sampling)
    return train_every_dream(r, task, dreams)


def train_every_dream(r: Reader, task: DreamTask, dreams: Sequence[str]) -> Learned:
    """Every non-empty dream trained into the fast level (:func:`model.sleep.dreaming.promote`): no selection, trials or gate."""
    kept = [d for d in dreams if d.strip()]
    losses = promote(r.model, r.tokenizer, r.cms, {task.context_id: task}, [(task.context_id, d) for d in kept], r.cfg, 0)
    table = pd.DataFrame({"context_id": task.context_id, "text": list(dreams), "trained": [bool(d.strip()) for d in dreams]})
    return Learned(losses=losses, gradient_steps=len(losses), n_dreams=len(kept),
                   funnel={"generated": len(dreams), "trained": len(kept)}, dreams=table,
                   dream_tokens=count_tokens(r.tokenizer, kept))


def count_tokens(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> int:
    """Tokens of ``texts`` (no special tokens): the training tokens dreams add."""
    return sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)


def after_wake(wake: Learned, then: Learned) -> Learned:
    """``then`` on top of the wake that read the passage: one record with both phases' losses and gradient steps."""
    then.losses = wake.losses + then.losses
    then.gradient_steps += wake.gradient_steps
    return then


def learn_passage_dreams(r: Reader, task: DreamTask) -> Learned:
    """``passage_dreams``: the wake (:func:`learn_passage_finetune`), then every non-empty dream of the dream
    policy, sampled after the wake (memory on, dream mode as configured), trained in on top: SEAL's
    "passage + synthetic data" without selection, trials or gate."""
    wake = learn_passage_finetune(r, task)
    _, dreams = generate_dreams(r.model, r.tokenizer, r.cms, task, r.cfg, r.seed, r.sampling)
    return after_wake(wake, train_every_dream(r, task, dreams))


def learn_passage_sleep(r: Reader, task: DreamTask) -> Learned:
    """``passage_sleep`` / ``passage_sleep_trained``: the wake (:func:`learn_passage_finetune`), then the full
    dream stage (:func:`learn_sleep`) on top, as a sleep follows the wake that read the passage. Which policy
    dreams (untrained or trained) is the state's (``dream.policy``)."""
    wake = learn_passage_finetune(r, task)
    return after_wake(wake, learn_sleep(r, task))


def learn_sleep(r: Reader, task: DreamTask) -> Learned:
    """``sleep``: the lifecycle's dream stage on one passage, then the gate, then promotion.

    :func:`model.sleep.dreaming.dream_about` samples in dream mode, scores and selects dreams,
    tries the selected ones in isolation and runs ReST-EM on the fast level (kept, as in
    the lifecycle); ``r.gate`` decides the promoted dreams, which are trained in.
    """
    cfg = r.cfg
    rows = dream_about(r.model, r.tokenizer, r.cms, task, cfg, period=0, seed=r.seed, sampling=r.sampling)
    rest = len({row.round for row in rows if row.reward == 1.0}) * cfg.rest_steps  # ReST-EM: steps per rewarded round
    table = add_check_columns(pd.DataFrame([asdict(row) for row in rows]), cfg.gate)
    gated = r.gate(table)
    promoted = gated[gated["promoted"]]
    losses = promote(r.model, r.tokenizer, r.cms, {task.context_id: task},
                     list(zip(promoted["context_id"], promoted["text"])), cfg, 0)
    funnel = {
        "generated": int(len(gated)),
        "selected": int(gated["selected"].sum()),
        "rewarded": int((gated["reward"] == 1.0).sum()),
        "passed_gate": int(gated["gate_passed"].sum()) if "gate_passed" in gated else int(len(promoted)),
        "promoted": int(len(promoted)),
        **rewarded_rejections(gated),
    }
    return Learned(losses=losses, gradient_steps=rest + len(losses), n_dreams=int(len(promoted)), funnel=funnel,
                   dreams=gated, dream_tokens=count_tokens(r.tokenizer, list(promoted["text"])))


#: Each method's way to learn a passage.
LEARNERS: dict[str, Callable[[Reader, DreamTask], Learned]] = {
    "base": learn_base,
    "passage_finetune": learn_passage_finetune,
    "base_dreams": learn_base_dreams,
    "sleep": learn_sleep,
    "passage_dreams": learn_passage_dreams,
    "passage_sleep": learn_passage_sleep,
    "passage_sleep_trained": learn_passage_sleep,
}
#: The methods whose dreams pass the gate (Reader.gate): the methods that sleep.
GATED_METHODS = frozenset({"sleep", "passage_sleep", "passage_sleep_trained"})
METHODS = tuple(LEARNERS)


def uses_passage_experts(method: str, setting: str) -> bool:
    """Whether ``method`` ends each passage in its own passage expert in continued mode (``knowledge.passage_experts``:
    'sleep' the methods that sleep, 'all' every method that learns, 'none' no method)."""
    if setting not in ("sleep", "all", "none"):
        raise ValueError(f"knowledge.passage_experts must be sleep, all or none, got {setting!r}")
    return (setting == "all" and method != "base") or (setting == "sleep" and method in GATED_METHODS)


def rewarded_rejections(gated: pd.DataFrame) -> dict[str, int]:
    """Useful dreams the gate turned away: ``rejected_rewarded:<check>`` = rewarded dreams (their trial raised
    tau) that failed ``check`` (a dream can fail several)."""
    if "failed_checks" not in gated:
        return {}
    out: dict[str, int] = {}
    for checks in gated.loc[(gated["reward"] == 1.0) & ~gated["gate_passed"].astype(bool), "failed_checks"]:
        for name in [c for c in str(checks).split(";") if c]:
            out[f"rejected_rewarded:{name}"] = out.get(f"rejected_rewarded:{name}", 0) + 1
    return out


def learn(method: str, r: Reader, task: DreamTask) -> Learned:
    """Learn one passage (``task``) into the fast level with ``method`` (one of METHODS)."""
    if method not in LEARNERS:
        raise ValueError(f"unknown knowledge method {method!r}; one of {', '.join(METHODS)}")
    if method in GATED_METHODS and r.gate is None:
        raise ValueError(f"the {method} method needs the dream gate (gate=...)")
    return LEARNERS[method](r, task)
