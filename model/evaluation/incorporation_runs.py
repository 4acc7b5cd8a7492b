"""Knowledge incorporation over many passages (docs/design.md §5 "Knowledge incorporation"): each passage alone from one
starting state (``single``), or the passages in turn into one state (``continued``; with passage experts, each passage
consolidated into its own read-only expert and questions routed to it: model/memory/passage_experts.py), with their rows."""

from __future__ import annotations

import time
from dataclasses import replace
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager as ContextManager
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from model.config import DreamConfig
from model.evaluation.incorporation import (
    Learned,
    MemorySnapshot,
    Reader,
    evaluate_passage,
    fresh_fast_expert,
    learn,
    routed_tau,
)
from model.evaluation.knowledge import Passage, passage_sentences
from model.memory.cms import ContinuumMemory
from model.memory.passage_experts import (
    Features,
    add_passage_prototypes,
    check_passage_room,
    consolidate_passage,
    default_features,
    passage_view,
    route_questions,
)
from model.sleep.dreaming import DreamTask, task_from_passage
from model.sleep.trial_lora import AnswerLoglik


def passage_seed(seed: int, index: int) -> int:
    """The sampling seed of passage ``index`` in a run with ``seed`` (as bench/knowledge_incorporation.py)."""
    return seed * 1_013 + index


def _row(index: int, passage: Passage, learned: Learned, measured: dict[str, Any], seconds: float) -> dict[str, Any]:
    return {"index": index, "title": passage.title, "n_questions": len(passage.questions), **measured,
            "gradient_steps": learned.gradient_steps, "n_dreams": learned.n_dreams, "dream_tokens": learned.dream_tokens,
            "funnel": learned.funnel, "losses": [round(x, 5) for x in learned.losses], "seconds": round(seconds, 2)}


def run_single(
    method: str,
    reader: Reader,
    passages: Sequence[tuple[int, Passage]],
    done: Sequence[int] = (),
    on_passage: Callable[[dict[str, Any], Learned], None] | None = None,
) -> list[dict[str, Any]]:
    """Single-passage incorporation (n=1): each passage from the same fresh state, measured right after.

    ``passages`` are (index, passage) pairs; indices in ``done`` are skipped (a resumed
    run). The state is ``reader.cms`` after :func:`fresh_fast_expert`, restored before every
    passage, so no passage sees another; passage ``index`` samples with
    :func:`passage_seed` of ``reader.seed``. ``on_passage(row, learned)`` gets each row as it
    is made (to persist progress). Returns the rows of the passages run here.
    """
    cms, cfg = reader.cms, reader.cfg
    fresh_fast_expert(cms)
    snapshot = MemorySnapshot(cms)
    rows = []
    for index, passage in passages:
        if index in done:
            continue
        start = time.perf_counter()
        snapshot.restore(cms)
        task = task_from_passage(passage, f"passage{index}", cfg)
        learned = learn(method, replace(reader, seed=passage_seed(reader.seed, index)), task)
        row = _row(index, passage, learned, evaluate_passage(reader.model, reader.tokenizer, passage, task, cfg),
                   time.perf_counter() - start)
        rows.append(row)
        if on_passage is not None:
            on_passage(row, learned)
    snapshot.restore(cms)
    return rows


def passage_tau(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, task: DreamTask, cfg: DreamConfig,
                routes: Sequence[int] | None = None, view: Callable[[int], ContextManager[None]] | None = None) -> float:
    """The passage's tau (cheap: no generation); with ``routes``, each question's in ``view`` of its period."""
    return routed_tau(AnswerLoglik(model, tokenizer, list(task.tau_prompts), list(task.tau_answers), cfg.max_length),
                      routes, view)


def mean_tau(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, passages: Sequence[tuple[int, Passage]],
             cfg: DreamConfig, cms: ContinuumMemory | None = None, features: Features = default_features) -> float:
    """Mean over ``passages`` of each passage's tau (cheap: no generation); with ``cms``, every question routed to
    its passage expert (:func:`answer_routes`)."""
    taus = []
    for index, passage in passages:
        task = task_from_passage(passage, f"passage{index}", cfg)
        routes, view = answer_routes(cms, passage, features) if cms is not None else (None, None)
        taus.append(passage_tau(model, tokenizer, task, cfg, routes, view))
    return sum(taus) / len(taus)


def answer_routes(cms: ContinuumMemory, passage: Passage, features: Features = default_features
                  ) -> tuple[list[int], Callable[[int], ContextManager[None]]]:
    """Each of the passage's questions routed to a learned passage's period, and the view that answers in it."""
    if cms.prototypes is None:
        raise ValueError("passage experts: the state has no passage prototypes to route questions with")
    routes = route_questions(cms.prototypes, [q.question for q in passage.questions], features)
    return routes, lambda period: passage_view(cms, period)


def learn_into_expert(method: str, reader: Reader, task: DreamTask, passage: Passage, period: int,
                      features: Features = default_features) -> Learned:
    """One passage as a sleep that consolidates it (model/memory/passage_experts.py): a fresh fast expert (drawn from
    ``reader.seed``, the passage's sampling seed) learns it with no earlier passage's expert on, is copied into a
    read-only expert of the slowest level for ``period``, the fast level is freed, and the passage's sentences
    become its prototypes."""
    cms = reader.cms
    cms.begin_period(period)
    cms.reseed(reader.seed)  # the passage's own draws: a resumed run learns it as an uninterrupted one does
    fresh_fast_expert(cms)
    with passage_view(cms, None):
        learned = learn(method, reader, task)
    consolidate_passage(cms, task.context_id)
    cms.prototypes = add_passage_prototypes(cms.prototypes, features(passage_sentences(passage.context)), period)
    return learned


def run_continued(
    method: str,
    reader: Reader,
    passages: Sequence[tuple[int, Passage]],
    start: int = 0,
    tau_every: int = 0,
    on_learned: Callable[[int, dict[str, Any], Learned], None] | None = None,
    experts: bool = False,
    features: Features = default_features,
) -> list[dict[str, Any]]:
    """Continued pretraining over ``passages``: one state learns them in order, then answers every question.

    Without ``experts`` the fast level is never reset between passages: the same fast
    parameters keep training. With ``experts`` the k-th passage is learned by
    :func:`learn_into_expert` (its own read-only expert, period k, and prototypes) and every
    question is answered by the expert of the passage it is routed to; each row then also
    records ``routed_own``, the share of its questions routed to their own passage.
    With ``start`` = k > 0 the run resumes: ``cms`` must hold the state after
    the first k passages (and it is not reset); passage ``index`` samples with
    :func:`passage_seed` of ``reader.seed``. After every ``tau_every`` passages (0:
    never) the mean tau over the passages learned so far is recorded in that passage's
    row (``tau_learned``). ``on_learned(k, row, learned)`` is called after passage k-1,
    the k-th, is learned (to save the state and progress). Returns the final rows: one
    per passage with its EM, F1 and tau measured at the end.
    """
    model, tokenizer, cms, cfg = reader.model, reader.tokenizer, reader.cms, reader.cfg
    if experts:
        check_passage_room(cms, len(passages) - start)
    if start == 0 and not experts:
        fresh_fast_expert(cms)
    routed = cms if experts else None
    for k in range(start, len(passages)):
        t0 = time.perf_counter()
        index, passage = passages[k]
        task = task_from_passage(passage, f"passage{index}", cfg)
        r = replace(reader, seed=passage_seed(reader.seed, index))
        learned = learn_into_expert(method, r, task, passage, k, features) if experts else learn(method, r, task)
        row: dict[str, Any] = {"index": index, "learned": k + 1, "gradient_steps": learned.gradient_steps,
                               "n_dreams": learned.n_dreams, "funnel": learned.funnel,
                               "losses": [round(x, 5) for x in learned.losses]}
        if tau_every and (k + 1) % tau_every == 0:
            row["tau_learned"] = mean_tau(model, tokenizer, passages[: k + 1], cfg, routed, features)
        row["seconds"] = round(time.perf_counter() - t0, 2)
        if on_learned is not None:
            on_learned(k + 1, row, learned)
    out = []
    for k, (index, passage) in enumerate(passages):
        t0 = time.perf_counter()
        task = task_from_passage(passage, f"passage{index}", cfg)
        routes, view = answer_routes(cms, passage, features) if experts else (None, None)
        own = {"routed_own": sum(r == k for r in routes) / len(routes)} if routes is not None else {}
        out.append({"index": index, "title": passage.title, "n_questions": len(passage.questions),
                    **evaluate_passage(model, tokenizer, passage, task, cfg, routes, view), **own,
                    "seconds": round(time.perf_counter() - t0, 2)})
    return out


__all__ = ["_row", "answer_routes", "learn_into_expert", "mean_tau", "passage_seed", "passage_tau", "run_continued",
           "run_single"]
