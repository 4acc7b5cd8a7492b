"""Answering through prototype routing (docs/design.md §1 "Routing"): each input is answered in the view of the period
its nearest prototype names, where only experts of periods <= p fire."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from model.decoding.forward import TrunkCache
from model.memory.cms import ContinuumMemory
from model.memory.prototypes import route, sequence_features
from model.memory.wake import label_scores, split_template

T = TypeVar("T")
R = TypeVar("R")


@contextlib.contextmanager
def period_view(cms: ContinuumMemory, period: int) -> Iterator[None]:
    """Only experts of periods <= ``period`` fire (experts without a period always fire), among those the caller
    has not masked or hidden already."""
    hidden = {li: [e.slot for e in level if e.active and e.period is not None and e.period > period]
              for li, level in enumerate(cms.experts)}
    with cms.levels_masked([], hidden={li: s for li, s in hidden.items() if s}):
        yield


def routed_periods(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cms: ContinuumMemory,
                   prompts: Sequence[str], batch_size: int, max_length: int) -> list[int] | None:
    """The period of each prompt's nearest prototype (None without prototypes or without prompts)."""
    protos = cms.prototypes
    if protos is None or not prompts:
        return None
    return route(protos, sequence_features(model, tokenizer, prompts, protos.layer, batch_size, max_length)).tolist()


def map_routed(cms: ContinuumMemory | None, periods: Sequence[int] | None, items: Sequence[T],
               fn: Callable[[list[T]], Sequence[R]],
               view: Callable[[int], contextlib.AbstractContextManager[None]] | None = None) -> list[R]:
    """``fn`` over ``items``, each item in ``view`` of its routed period (default: :func:`period_view` of ``cms``; all
    items at once, every expert on, when ``periods`` is None); one call per period; the results in the order of
    ``items``."""
    if periods is None:
        return list(fn(list(items)))
    if view is None:
        if cms is None:
            raise ValueError("map_routed: neither a state for the period view nor a view")
        view = lambda period: period_view(cms, period)  # noqa: E731
    out: list[R] = [None] * len(items)  # type: ignore[list-item]
    for p in sorted(set(periods)):
        idx = [i for i, q in enumerate(periods) if q == p]
        with view(p):
            for i, y in zip(idx, fn([items[i] for i in idx])):
                out[i] = y
    return out


def routed_scores(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cms: ContinuumMemory, template: str,
                  texts: Sequence[str], labels: Sequence[str], batch_size: int, max_length: int,
                  trunk: TrunkCache | None = None) -> tuple[torch.Tensor, list[int] | None]:
    """Log-likelihood of every label after every text (N, C); with prototypes, each text in the view of its
    routed period. Also returns each text's routed period (None without prototypes). ``trunk``: see
    :func:`model.memory.wake.score_candidates` (for scoring the same texts in several states)."""
    prompts = [split_template(template, t, labels[0])[0] for t in texts]
    periods = routed_periods(model, tokenizer, cms, prompts, batch_size, max_length)
    rows = map_routed(cms, periods, list(texts),
                      lambda part: list(label_scores(model, tokenizer, template, part, labels, batch_size, max_length,
                                                     trunk=trunk)))
    return (torch.stack(rows) if rows else torch.empty(0, len(labels))), periods


def routed_classify(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cms: ContinuumMemory, template: str,
                    texts: Sequence[str], labels: Sequence[str], batch_size: int, max_length: int,
                    trunk: TrunkCache | None = None) -> tuple[list[str], list[int] | None]:
    """Predict one of ``labels`` per text; with prototypes, each text in the view of its routed period.

    Returns the predictions and each text's routed period (None without prototypes). ``trunk``: see
    :func:`routed_scores`.
    """
    scores, periods = routed_scores(model, tokenizer, cms, template, texts, labels, batch_size, max_length, trunk)
    return [labels[j] for j in scores.argmax(dim=1).tolist()], periods


__all__ = ["map_routed", "period_view", "routed_classify", "routed_periods", "routed_scores"]
