"""How each method of the long-context comparison reads a document and answers its question (issue #16).

Every method sees one :class:`model.evaluation.long_context.Document` at a time, from the same fresh
state, and answers the item's question by log-likelihood over its candidates:

* ``facts_only``: a reference, not a reader: the question after the item's facts alone, no
  distractor prose (as much of them as fits the window; BABILong's "0k"): what the model can
  answer when the facts are all it sees, the ceiling of recall (:func:`answer_facts_only`).
* ``in_context``: no training; the question after as much of the document's end as fits
  the window (:func:`answer_in_context`).
* ``retrieval``: no training; the question after the document's window-sized piece that
  the MiniLM embedder finds closest to the question (:func:`answer_retrieval`).
* ``finetune``: LoRA adapters learn next-token prediction on the document's pieces, one
  step per piece (:func:`read_lora`), then the question with no document.
* ``cms``: the continuum memory system reads the pieces as a wake does (the fast level
  every step, slower levels on their chunk schedule, eq. 2), no sleep (:func:`read_cms`).
* ``sleep_1`` / ``sleep_2`` / ``sleep_3``: the same wake with 1, 2 or 3 slower levels
  (:func:`sleep_levels`) and sleeps: after every ``sleep_every`` pieces the level pairs
  whose schedule fired are consolidated (Knowledge Seeding, model/sleep/consolidation.py), and
  at the document's end a last sleep consolidates every level that has read something
  since it was last consolidated, slowest pair first as the lifecycle orders them. The
  data D of a consolidation are prompts cut at the sentence ends of the pieces that level
  read (:func:`boundary_prompts`): the teacher writes what follows each.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from model.config import CMSConfig, ConsolidationConfig, LevelConfig, SamplingConfig
from model.evaluation.baselines import train_sequential
from model.evaluation.knowledge import passage_chunks
from model.evaluation.long_context import SENTENCE_END, Document, Item, answer, question_prompt, tail_context
from model.memory.cms import ContinuumMemory
from model.memory.optimizer import ChunkedOptimizer
from model.memory.wake import ensure_writable, train_period
from model.sleep.consolidation import consolidate, due_consolidations

METHODS = ("facts_only", "in_context", "retrieval", "finetune", "cms", "sleep_1", "sleep_2", "sleep_3")
#: What every piece is trained after (a prompt must have a token; the loss is on the piece only).
READ_PROMPT = "Text:"
#: Methods that train on the document (and answer with no document in the prompt).
READING_METHODS = ("finetune", "cms", "sleep_1", "sleep_2", "sleep_3")


def slow_levels(method: str) -> int:
    """Slower levels a sleep method consolidates into (``sleep_2`` -> 2); 0 for every other method."""
    return int(method.split("_")[1]) if method.startswith("sleep_") else 0


def sleep_levels(base: CMSConfig, n_slow: int, sleep_every: int) -> CMSConfig:
    """The CMS of ``sleep_<n_slow>``: the base's fast level, then ``n_slow`` copies of its first slower level
    with chunk sizes ``sleep_every * 4**(l-1)``: level 1 is consolidated into at every sleep, level 2 at
    every fourth, level 3 at every sixteenth (and all of them at the document's end)."""
    if n_slow < 1:
        raise ValueError(f"a sleep method needs at least one slower level, got {n_slow}")
    if len(base.levels) < 2:
        raise ValueError("cms.levels needs a slower level to copy for the sleep methods (it has only one)")
    fast, slow = base.levels[0], base.levels[1]
    levels = [fast.model_copy(update={"chunk_size": 1})]
    levels += [slow.model_copy(update={"name": f"{slow.name}{li}", "chunk_size": sleep_every * 4 ** (li - 1)})
               for li in range(1, n_slow + 1)]
    return base.model_copy(update={"levels": [LevelConfig.model_validate(lv.model_dump()) for lv in levels]})


def document_pieces(tokenizer: PreTrainedTokenizerBase, doc: Document, window: int) -> list[str]:
    """The document cut into consecutive pieces of at most ``window`` tokens, at sentence ends."""
    return passage_chunks(tokenizer, doc.text, window)


def boundary_prompts(tokenizer: PreTrainedTokenizerBase, pieces: Sequence[str], n: int, tokens: int,
                     seed: int) -> list[str]:
    """Up to ``n`` prompts, each the last ``tokens`` tokens of a piece up to one of its sentence ends (a seeded
    sample of every sentence end in ``pieces``): what the teacher continues in a long-context sleep."""
    cuts = [(i, m.start()) for i, p in enumerate(pieces) for m in SENTENCE_END.finditer(p)]
    cuts += [(i, len(p.rstrip())) for i, p in enumerate(pieces) if p.strip()]  # a piece's end is a sentence end
    rng = random.Random(seed)
    chosen = sorted(rng.sample(cuts, min(n, len(cuts)))) if cuts else []
    prompts = []
    for i, at in chosen:
        ids = tokenizer(pieces[i][:at], add_special_tokens=False)["input_ids"][-tokens:]
        prompts.append(tokenizer.decode(ids))
    return [p for p in prompts if p.strip()]


@dataclass
class Reading:
    """What reading one document cost and did."""

    losses: list[float] = field(default_factory=list)
    gradient_steps: int = 0
    sleeps: list[dict[str, Any]] = field(default_factory=list)  # one record per consolidation


def _context_room(tokenizer: PreTrainedTokenizerBase, item: Item, window: int) -> int:
    """Tokens of context that fit ``window`` beside ``item``'s question and its longest candidate."""
    room = window - len(tokenizer(question_prompt(item.question))["input_ids"]) \
        - max(len(tokenizer(" " + c, add_special_tokens=False)["input_ids"]) for c in item.candidates) - 4
    if room < 1:
        raise ValueError(f"window {window} leaves no room for a context beside the question of {item.item_id}")
    return room


def _answer_after_tail(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, item: Item, text: str,
                       window: int, scoring: str) -> int:
    """The best candidate for ``item``'s question after the last tokens of ``text`` that fit ``window`` with it."""
    prompt = question_prompt(item.question, tail_context(tokenizer, text, _context_room(tokenizer, item, window)))
    return answer(model, tokenizer, [prompt], item.candidates, window, scoring)[0]


def answer_in_context(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, doc: Document,
                      window: int, scoring: str = "pmi") -> int:
    """``in_context``: the question after the document's last tokens that fit ``window`` with it."""
    return _answer_after_tail(model, tokenizer, doc.item, doc.text, window, scoring)


def answer_facts_only(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, doc: Document,
                      window: int, scoring: str = "pmi") -> int:
    """``facts_only``: the question after the item's facts alone (their last tokens that fit ``window`` with it),
    with no distractor prose: the same question and candidates as every method, at the easiest context."""
    return _answer_after_tail(model, tokenizer, doc.item, " ".join(doc.item.facts), window, scoring)


def answer_retrieval(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, doc: Document, window: int,
                     similarity: Callable[[Sequence[str], Sequence[str]], list[float]],
                     scoring: str = "pmi") -> tuple[int, int]:
    """``retrieval``: the question after the piece (of the window's room) most similar to it by
    ``similarity(questions, pieces)`` (the MiniLM cosine). Returns (chosen candidate, piece index)."""
    item = doc.item
    room = _context_room(tokenizer, item, window)
    pieces = passage_chunks(tokenizer, doc.text, room)
    scores = similarity([item.question] * len(pieces), pieces)
    best = max(range(len(pieces)), key=scores.__getitem__)
    prompt = question_prompt(item.question, pieces[best])
    return answer(model, tokenizer, [prompt], item.candidates, window, scoring)[0], best


def answer_from_memory(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, doc: Document,
                       max_length: int, scoring: str = "pmi") -> int:
    """The question with no document in the prompt (what every reading method is measured by)."""
    return answer(model, tokenizer, [question_prompt(doc.item.question)], doc.item.candidates, max_length, scoring)[0]


def read_lora(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, params: Sequence[torch.nn.Parameter],
              pieces: Sequence[str], lr: float, epochs: int, max_length: int, grad_clip: float, seed: int) -> Reading:
    """``finetune``: next-token prediction on every piece, one AdamW step per piece, on the LoRA ``params``."""
    losses = train_sequential(model, tokenizer, params, [READ_PROMPT] * len(pieces), list(pieces), 1, max_length, epochs,
                              lr, grad_clip, seed=seed)
    return Reading(losses=losses, gradient_steps=len(losses))


def read_cms(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    cms: ContinuumMemory,
    pieces: Sequence[str],
    max_length: int,
    epochs: int,
    sleep_every: int,
    consolidation: ConsolidationConfig | None,
    seed: int,
    prompt_tokens: int = 64,
    judge: Any = None,
    sampling: SamplingConfig | None = None,
    grad_clip: float = 1.0,
    on_piece: Callable[[int], None] | None = None,
) -> Reading:
    """``cms`` (``consolidation`` None) and ``sleep_<n>``: a wake over the pieces, ``sleep_every`` pieces a period.

    One optimiser step call per piece (each level updated when its chunk ends, eq. 2), with a fresh
    optimiser. With ``consolidation``, a sleep follows every period: the pairs whose schedule fired are
    consolidated, slowest first, each on prompts cut from the pieces its source level has read since it
    was last consolidated; after the last period every pair whose source read something is. A level a
    consolidation freed gets a fresh writable expert before the next period.
    """
    levels = cms.cfg.levels
    optimizer = ChunkedOptimizer(cms, grad_clip=grad_clip)
    ensure_writable(cms, levels, origin="long-context")
    reading = Reading()
    since: list[list[str]] = [[] for _ in levels]  # pieces each level has read since it was last consolidated
    order = [p for _ in range(epochs) for p in pieces]
    n_periods = -(-len(order) // sleep_every)
    for k in range(n_periods):
        period = order[k * sleep_every:(k + 1) * sleep_every]
        before = cms.step
        logs = train_period(model, tokenizer, optimizer, [READ_PROMPT] * len(period), period, 1, max_length, seed=seed + k)
        reading.losses += [log.loss for log in logs]
        reading.gradient_steps += len(logs)
        for s in since:
            s += period
        if on_piece is not None:
            on_piece(len(period))
        if consolidation is None:
            continue
        last = k == n_periods - 1
        pairs = ([(li - 1, li) for li in range(len(levels) - 1, 0, -1) if since[li - 1]] if last
                 else due_consolidations(before, cms.step, levels))
        for src, dst in pairs:
            prompts = boundary_prompts(tokenizer, since[src], consolidation.prompt_buffer_size, prompt_tokens,
                                       seed * 31 + k * 7 + dst)
            if not prompts:
                continue
            res = consolidate(model, tokenizer, cms, src, dst, prompts, consolidation, max_length, judge,
                              seed=seed * 1_009 + k * 31 + dst, origin=f"long-context:{src}->{dst}@{k}",
                              sampling=sampling, freeze=cms.cfg.freeze_consolidated)
            optimizer.drop_state(cms.level_parameters(src))
            optimizer.drop_state(cms.level_parameters(dst, [res.slot]))
            reading.gradient_steps += len(res.steps)
            reading.losses += [r.loss for r in res.steps]
            reading.sleeps.append({"period": k, "src": src, "dst": dst, "slot": res.slot, "prompts": len(prompts),
                                   "steps": len(res.steps), "merged": res.merged is not None})
            since[src] = []
        if pairs and not last:
            ensure_writable(cms, levels, origin="long-context")
    return reading


__all__ = ["METHODS", "READING_METHODS", "Reading", "answer_facts_only", "answer_from_memory", "answer_in_context",
           "answer_retrieval", "boundary_prompts", "document_pieces", "read_cms", "read_lora", "sleep_levels", "slow_levels"]
