"""Knowledge incorporation over many passages (docs/design.md §5 "Knowledge incorporation"): each passage alone from one
starting state (``single``), or the passages in turn into one state (``continued``), with their rows."""

from __future__ import annotations

import time
from dataclasses import replace
from collections.abc import Callable, Sequence
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from model.config import DreamConfig
from model.evaluation.incorporation import Learned, MemorySnapshot, Reader, evaluate_passage, fresh_fast_expert, learn
from model.evaluation.knowledge import Passage
from model.sleep.dreaming import task_from_passage
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


def mean_tau(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, passages: Sequence[tuple[int, Passage]],
             cfg: DreamConfig) -> float:
    """Mean over ``passages`` of each passage's tau (cheap: no generation)."""
    taus = []
    for index, passage in passages:
        task = task_from_passage(passage, f"passage{index}", cfg)
        taus.append(float(AnswerLoglik(model, tokenizer, list(task.tau_prompts), list(task.tau_answers),
                                       cfg.max_length)(None)))
    return sum(taus) / len(taus)


def run_continued(
    method: str,
    reader: Reader,
    passages: Sequence[tuple[int, Passage]],
    start: int = 0,
    tau_every: int = 0,
    on_learned: Callable[[int, dict[str, Any], Learned], None] | None = None,
) -> list[dict[str, Any]]:
    """Continued pretraining over ``passages``: one state learns them in order, then answers every question.

    The fast level is never reset between passages: the same fast parameters keep
    training. With ``start`` = k > 0 the run resumes: ``cms`` must hold the state after
    the first k passages (and it is not reset); passage ``index`` samples with
    :func:`passage_seed` of ``reader.seed``. After every ``tau_every`` passages (0:
    never) the mean tau over the passages learned so far is recorded in that passage's
    row (``tau_learned``). ``on_learned(k, row, learned)`` is called after passage k-1,
    the k-th, is learned (to save the state and progress). Returns the final rows: one
    per passage with its EM, F1 and tau measured at the end.
    """
    model, tokenizer, cms, cfg = reader.model, reader.tokenizer, reader.cms, reader.cfg
    if start == 0:
        fresh_fast_expert(cms)
    for k in range(start, len(passages)):
        t0 = time.perf_counter()
        index, passage = passages[k]
        task = task_from_passage(passage, f"passage{index}", cfg)
        learned = learn(method, replace(reader, seed=passage_seed(reader.seed, index)), task)
        row: dict[str, Any] = {"index": index, "learned": k + 1, "gradient_steps": learned.gradient_steps,
                               "n_dreams": learned.n_dreams, "funnel": learned.funnel,
                               "losses": [round(x, 5) for x in learned.losses]}
        if tau_every and (k + 1) % tau_every == 0:
            row["tau_learned"] = mean_tau(model, tokenizer, passages[: k + 1], cfg)
        row["seconds"] = round(time.perf_counter() - t0, 2)
        if on_learned is not None:
            on_learned(k + 1, row, learned)
    out = []
    for index, passage in passages:
        t0 = time.perf_counter()
        task = task_from_passage(passage, f"passage{index}", cfg)
        out.append({"index": index, "title": passage.title, "n_questions": len(passage.questions),
                    **evaluate_passage(model, tokenizer, passage, task, cfg),
                    "seconds": round(time.perf_counter() - t0, 2)})
    return out


__all__ = ["_row", "mean_tau", "passage_seed", "run_continued", "run_single"]
