"""Passage experts: continued knowledge incorporation through the sleep's consolidation and prototype routing
(docs/design.md §5 "Continued pretraining with passage experts"; issue #14).

When one state learns passages one after the other, training every passage into the one fast level
overwrites the earlier ones (docs/results/issue14/knowledge-policy-cpt/: after 50 passages a sleep
that dreams into the shared fast level ends below the base model on the first 10). Here each
passage's sleep ends as the lifecycle's does, with the fast level consolidated and freed:

1. :func:`consolidate_passage`: every active fast expert is copied, exactly (same rank), into a
   newly unlocked expert of the slowest level, made read-only and tagged with the passage's period;
   the fast level is then emptied.
2. :func:`add_passage_prototypes`: every sentence of the passage leaves one prototype, the sentence
   model's unit embedding (model/memory/prototypes.py: SENTENCE_LAYER), with the passage's period.
3. :func:`route_questions`: a question goes to the period of its most similar sentence (cosine);
   :func:`passage_view` then lets only that passage's experts fire.

Unlike the lifecycle's period view (model/memory/routed.py), which shows every expert up to the
routed period because a class-incremental task builds on the ones before it, a passage's experts
are its own: a passage is learned with no earlier passage's expert on (``passage_view(cms, None)``)
and answered with only its own. The cost is one expert per passage (the slowest level needs a
slot per passage: ``cms.levels[-1].n_experts``), a merge policy for a full level is not part of this.

Why a prototype per sentence and no standardisation: on 50 development passages (squad_val_dev800,
280 questions) the nearest sentence routed 95.7% of the questions to their own passage, the mean of
a passage's sentences 94.6%, the lifecycle's standardised prototypes 82-88% (cosine, Mahalanobis):
the standardisation is fixed by the first period's few sentences (docs/results/issue14/passage-routing/).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from model.memory.cms import CMSError, ContinuumMemory, NoFreeSlotError
from model.memory.prototypes import SENTENCE_LAYER, Prototypes, route, sentence_features

#: Origin prefix of the slowest level's experts that hold one passage.
PASSAGE_ORIGIN = "passage"
#: A feature function: texts -> (N, d) embeddings (the sentence model's by default).
Features = Callable[[Sequence[str]], torch.Tensor]


def default_features(texts: Sequence[str]) -> torch.Tensor:
    """all-MiniLM-L6-v2's unit embeddings (N, 384) of ``texts``."""
    return sentence_features(texts, batch_size=64)


def passage_level(cms: ContinuumMemory) -> int:
    """The level that keeps the passages: the slowest one (it must not be the fast level)."""
    if cms.n_levels < 2:
        raise CMSError("passage experts need a level slower than the fast one (cms.levels has one level)")
    return cms.n_levels - 1


def passage_slots(cms: ContinuumMemory, period: int | None = None) -> list[int]:
    """The slowest level's read-only passage experts (of ``period`` only, when given)."""
    return [e.slot for e in cms.experts[passage_level(cms)]
            if e.active and e.frozen and (e.origin or "").startswith(PASSAGE_ORIGIN)
            and (period is None or e.period == period)]


def check_passage_room(cms: ContinuumMemory, n_passages: int) -> None:
    """Before anything trains: the slowest level must have a free slot for each of ``n_passages`` passages."""
    level = passage_level(cms)
    free = len(cms.free_slots(level))
    if free < n_passages:
        lv = cms.cfg.levels[level]
        raise NoFreeSlotError(
            f"passage experts: {n_passages} passages to learn, but the slowest level ('{lv.name}') has {free} free "
            f"expert slots (cms.levels[{level}].n_experts = {lv.n_experts}); set it to at least "
            f"{lv.n_experts - free + n_passages} in the comparison's overrides, or knowledge.passage_experts: none")


def consolidate_passage(cms: ContinuumMemory, name: str) -> list[int]:
    """Sleep's consolidation for one passage: each active fast expert copied exactly into a new slowest-level expert
    of the current period (``cms.period``), read-only; the fast level freed. Returns the new slots.

    The copy reproduces the fast level's output when the slowest level's rank is at least the fast level's and
    top-k keeps every copied expert on, beside the slowest level's shared (non-passage) experts (both checked).
    Raises :class:`~model.memory.cms.NoFreeSlotError` when the slowest level has no free slot left.
    """
    level = passage_level(cms)
    fast, slow = cms.cfg.levels[0], cms.cfg.levels[level]
    if slow.d_low < fast.d_low:
        raise CMSError(f"passage experts: the slowest level's d_low ({slow.d_low}) is below the fast level's "
                       f"({fast.d_low}); the copy would not be exact")
    sources = cms.active_slots(0)
    shared = [s for s in cms.active_slots(level) if s not in passage_slots(cms)]  # on in every passage's view
    if len(sources) > fast.top_k or len(sources) + len(shared) > slow.top_k:
        raise CMSError(f"passage experts: {len(sources)} fast experts (fast top_k {fast.top_k}) beside {len(shared)} "
                       f"shared experts of the slowest level (top_k {slow.top_k}): top-k would not keep every copied "
                       "expert on, and the copy would not be exact")
    slots = []
    for s in sources:
        d = cms.unlock(level, origin=f"{PASSAGE_ORIGIN}:{name}")
        cms.copy_expert((0, s), (level, d))
        cms.freeze(level, d, reason=f"{PASSAGE_ORIGIN}:{name}")
        slots.append(d)
    cms.reset_level(0, reason=f"consolidated:{PASSAGE_ORIGIN}:{name}")
    return slots


@contextlib.contextmanager
def passage_view(cms: ContinuumMemory, period: int | None) -> Iterator[None]:
    """Only the passage experts of ``period`` fire among the passage experts (None: none of them, the view a new
    passage is learned in); the other levels and the slowest level's other experts are as they are."""
    level = passage_level(cms)
    hidden = [s for s in passage_slots(cms) if period is None or cms.experts[level][s].period != period]
    with cms.levels_masked([], hidden={level: hidden} if hidden else None):
        yield


def add_passage_prototypes(protos: Prototypes | None, features: torch.Tensor, period: int) -> Prototypes:
    """The prototypes with one per sentence of ``period``'s passage: features (N, d) as unit rows, no standardisation
    (mean 0, scale 1), cosine metric. A state's prototypes must all be of this kind."""
    if features.ndim != 2 or features.shape[0] == 0:
        raise ValueError(f"add_passage_prototypes: want (N >= 1, d) features, got {tuple(features.shape)}")
    z = F.normalize(features.float(), dim=1)
    d = z.shape[1]
    if protos is None:
        protos = Prototypes(SENTENCE_LAYER, torch.zeros(d), torch.ones(d), torch.empty(0, d),
                            torch.empty(0, dtype=torch.long))
    elif (protos.metric != "cosine" or protos.layer != SENTENCE_LAYER or protos.mean.shape != (d,)
          or bool(protos.mean.any()) or not bool((protos.scale == 1).all())):
        raise CMSError("the state's routing prototypes are not passage prototypes (unit sentence embeddings, "
                       "cosine, no standardisation); passage experts cannot add to them")
    keep = protos.periods != period
    return Prototypes(protos.layer, protos.mean, protos.scale, torch.cat([protos.centroids[keep], z]),
                      torch.cat([protos.periods[keep], torch.full((z.shape[0],), period, dtype=torch.long)]))


def route_questions(protos: Prototypes, questions: Sequence[str], features: Features = default_features) -> list[int]:
    """The period of each question's most similar passage sentence: (N,) periods."""
    if not questions:
        return []
    return route(protos, features(list(questions))).tolist()


__all__ = [
    "PASSAGE_ORIGIN",
    "Features",
    "add_passage_prototypes",
    "check_passage_room",
    "consolidate_passage",
    "default_features",
    "passage_level",
    "passage_slots",
    "passage_view",
    "route_questions",
]
