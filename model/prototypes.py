"""Prototype routing: which experts fire for an input, decided from the whole input (``cms.routing.by_prototype``).

Each wake period leaves K prototypes of where its inputs lie: spherical k-means over the
period's prompt features, a feature being the mean over the prompt's tokens of the
residual stream entering decoder layer ``feature_layer`` (at or below the first CMS layer,
so no memory level ever changes it, and a prototype stays valid for the model's whole
life). When the model answers an input, the input's nearest prototype names a period p,
and only experts of periods <= p fire (every expert records the period it learned last,
model/cms.py): the model answers an old task's input with the experts it had when it
learned that task, and a later expert cannot override it. Prototypes are statistics of
the model's own states (standardised means of hidden states), not stored examples.

Applied where the model answers: classification and evaluation, model/serving.py's predict and
generate, the exported model (model/export.py). Training and the sleep's sampling run with every
expert of the current period on. The routing loss (model/routing.py) is the other, learned,
mechanism; it is off by default.
"""

from __future__ import annotations

import bisect
import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from model.cms import CMSError, ContinuumMemory
from model.forward import prefix_hidden
from model.wake import label_scores, split_template

T = TypeVar("T")
R = TypeVar("R")

PROTOTYPE_KEYS = ("routing.mean", "routing.scale", "routing.centroids", "routing.periods", "routing.layer")


@dataclass
class Prototypes:
    """Where each period's inputs lie, at decoder layer ``layer``.

    mean, scale: (d,) standardisation fixed by the first period's features;
    centroids: (P, d) unit vectors (K per period); periods: (P,) the period of each centroid.
    """

    layer: int
    mean: torch.Tensor
    scale: torch.Tensor
    centroids: torch.Tensor
    periods: torch.Tensor

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {"routing.mean": self.mean, "routing.scale": self.scale, "routing.centroids": self.centroids,
                "routing.periods": self.periods, "routing.layer": torch.tensor([self.layer])}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], where: str) -> "Prototypes":
        missing = [k for k in PROTOTYPE_KEYS if k not in tensors]
        if missing:
            raise CMSError(f"{where}: routing tensors {missing} missing")
        c, per = tensors["routing.centroids"].float(), tensors["routing.periods"].long()
        mean, scale = tensors["routing.mean"].float(), tensors["routing.scale"].float()
        if c.ndim != 2 or per.shape != (c.shape[0],) or mean.shape != (c.shape[1],) or scale.shape != mean.shape:
            raise CMSError(f"{where}: routing tensors have inconsistent shapes (centroids {tuple(c.shape)}, "
                           f"periods {tuple(per.shape)}, mean {tuple(mean.shape)}, scale {tuple(scale.shape)})")
        return cls(int(tensors["routing.layer"][0]), mean, scale, c, per)


@torch.no_grad()
def sequence_features(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                      layer: int, batch_size: int, max_length: int) -> torch.Tensor:
    """Mean over each prompt's tokens of the residual stream entering decoder layer ``layer``: (N, d).

    Right padding under a causal mask: a prompt's tokens never see the padding after them.
    """
    if not prompts:
        raise ValueError("sequence_features: no prompts")
    ids = [list(p)[-max_length:] for p in tokenizer(list(prompts), add_special_tokens=True)["input_ids"]]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    for start in range(0, len(ids), batch_size):
        rows = ids[start : start + batch_size]
        T = max(len(r) for r in rows)
        input_ids = torch.tensor([r + [pad] * (T - len(r)) for r in rows])
        real = torch.tensor([[1.0] * len(r) + [0.0] * (T - len(r)) for r in rows])  # (R, T)
        pos = torch.arange(T).expand(len(rows), T)
        h = prefix_hidden(model, input_ids, pos, layer).float().cpu()  # (R, T, d)
        out.append((h * real[..., None]).sum(1) / real.sum(1, keepdim=True))
    return torch.cat(out)


def spherical_kmeans(x: torch.Tensor, k: int, iters: int = 25, seed: int = 0) -> torch.Tensor:
    """K unit centroids (k, d) of unit rows x (N, d) by cosine similarity; k is cut to N."""
    k = min(k, x.shape[0])
    gen = torch.Generator().manual_seed(seed)
    c = x[torch.randperm(x.shape[0], generator=gen)[:k]].clone()
    for _ in range(iters):
        assign = (x @ c.T).argmax(dim=1)  # (N,)
        new = torch.zeros_like(c).index_add_(0, assign, x)
        empty = new.norm(dim=1) == 0
        new[empty] = c[empty]  # an empty cluster keeps its centroid
        new = F.normalize(new, dim=1)
        if torch.equal(new, c):
            break
        c = new
    return c


def standardise(features: torch.Tensor, protos: Prototypes) -> torch.Tensor:
    """Features (N, d) -> unit rows (N, d) in the prototypes' standardised space."""
    return F.normalize((features.float() - protos.mean) / protos.scale, dim=1)


def add_period(protos: Prototypes | None, features: torch.Tensor, period: int, k: int, layer: int,
               seed: int = 0) -> Prototypes:
    """The prototypes with ``period``'s K centroids (re)placed, from its inputs' features (N, d).

    The first period's features fix the standardisation (per-dimension mean and spread).
    """
    features = features.float()
    if protos is None:
        mean, scale = features.mean(0), features.std(0, unbiased=False) + 1e-3
        protos = Prototypes(layer, mean, scale, torch.empty(0, features.shape[1]), torch.empty(0, dtype=torch.long))
    elif protos.layer != layer:
        raise CMSError(f"cms.routing.feature_layer is {layer} but the state's prototypes were made at layer {protos.layer}")
    cent = spherical_kmeans(standardise(features, protos), k, seed=seed)
    keep = protos.periods != period
    return Prototypes(layer, protos.mean, protos.scale, torch.cat([protos.centroids[keep], cent]),
                      torch.cat([protos.periods[keep], torch.full((cent.shape[0],), period, dtype=torch.long)]))


def view_class(cms: ContinuumMemory, period: int) -> int:
    """Which view ``period`` routes to: :func:`period_view` of p hides the experts of periods > p, so two
    periods with no active expert's period between them (a < e <= b) see the same experts. The class is the
    number of active experts' distinct periods <= ``period``."""
    return bisect.bisect_right(sorted({e.period for level in cms.experts for e in level
                                       if e.active and e.period is not None}), period)


def compact(protos: Prototypes, cms: ContinuumMemory, k: int, seed: int = 0) -> Prototypes:
    """The prototypes with every group of periods that share a view (:func:`view_class`) reduced to K
    centroids of the latest of them (spherical k-means over the group's centroids).

    Routing to any period of a group answers with the same experts, so the group needs one period's worth
    of prototypes. Groups only ever coarsen (a new expert belongs to the current period or later; a merge or
    a writable expert moving to the next period removes a boundary), so this bounds the prototypes by
    K x (distinct expert periods + 1) however many periods the model lives: the merges of a full level
    (model/merging.py) are what makes old periods share a view.
    """
    classes = [view_class(cms, int(p)) for p in protos.periods.tolist()]
    if len(set(classes)) == len(set(protos.periods.tolist())):
        return protos  # every period its own view: nothing to share
    cents, pers = [], []
    for c in sorted(set(classes)):
        idx = [i for i, x in enumerate(classes) if x == c]
        rep = int(protos.periods[idx].max())
        group = protos.centroids[idx]
        if len(set(protos.periods[idx].tolist())) > 1:
            group = spherical_kmeans(group, k, seed=seed * 1_009 + rep)
        cents.append(group)
        pers.append(torch.full((group.shape[0],), rep, dtype=torch.long))
    return Prototypes(protos.layer, protos.mean, protos.scale, torch.cat(cents), torch.cat(pers))


def route(protos: Prototypes, features: torch.Tensor) -> torch.Tensor:
    """The period of each input's nearest prototype (cosine): (N,) long."""
    sims = standardise(features, protos) @ protos.centroids.T  # (N, P)
    return protos.periods[sims.argmax(dim=1)]


@contextlib.contextmanager
def period_view(cms: ContinuumMemory, period: int) -> Iterator[None]:
    """Only experts of periods <= ``period`` fire (experts without a period always fire)."""
    hidden = {li: [e.slot for e in level if e.active and e.period is not None and e.period > period]
              for li, level in enumerate(cms.experts)}
    with cms.levels_masked([], hidden={li: s for li, s in hidden.items() if s}):
        yield


def feature_layer(cms: ContinuumMemory, layer: int | None) -> int:
    """The decoder layer whose input is the routing feature: ``layer``, or a quarter of the depth by default.

    It must lie at or below the first CMS layer, so that no memory level changes the features.
    """
    n_layers = len(cms.base_model[0].get_decoder().layers)
    chosen = n_layers // 4 if layer is None else layer
    if not 0 <= chosen <= cms.layer_ids[0]:
        raise CMSError(f"cms.routing.feature_layer: {chosen} must be within 0..{cms.layer_ids[0]} (the first CMS "
                       f"layer; the model has {n_layers} decoder layers), so that memory never changes the features")
    return chosen


def learn_prototypes(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cms: ContinuumMemory,
                     prompts: Sequence[str], period: int, layer: int | None, k: int, batch_size: int, max_length: int,
                     seed: int = 0) -> Prototypes:
    """Wake: ``period``'s prototypes from its prompts, into ``cms.prototypes`` (returned)."""
    at = feature_layer(cms, layer)
    feats = sequence_features(model, tokenizer, prompts, at, batch_size, max_length)
    cms.prototypes = compact(add_period(cms.prototypes, feats, period, k, at, seed=seed), cms, k, seed=seed)
    return cms.prototypes


def routed_periods(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cms: ContinuumMemory,
                   prompts: Sequence[str], batch_size: int, max_length: int) -> list[int] | None:
    """The period of each prompt's nearest prototype (None without prototypes or without prompts)."""
    protos = cms.prototypes
    if protos is None or not prompts:
        return None
    return route(protos, sequence_features(model, tokenizer, prompts, protos.layer, batch_size, max_length)).tolist()


def map_routed(cms: ContinuumMemory, periods: Sequence[int] | None, items: Sequence[T],
               fn: Callable[[list[T]], Sequence[R]]) -> list[R]:
    """``fn`` over ``items``, each item in the view of its routed period (all items at once, every expert on,
    when ``periods`` is None); one call per period; the results in the order of ``items``."""
    if periods is None:
        return list(fn(list(items)))
    out: list[R] = [None] * len(items)  # type: ignore[list-item]
    for p in sorted(set(periods)):
        idx = [i for i, q in enumerate(periods) if q == p]
        with period_view(cms, p):
            for i, y in zip(idx, fn([items[i] for i in idx])):
                out[i] = y
    return out


def routed_scores(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cms: ContinuumMemory, template: str,
                  texts: Sequence[str], labels: Sequence[str], batch_size: int, max_length: int
                  ) -> tuple[torch.Tensor, list[int] | None]:
    """Log-likelihood of every label after every text (N, C); with prototypes, each text in the view of its
    routed period. Also returns each text's routed period (None without prototypes)."""
    prompts = [split_template(template, t, labels[0])[0] for t in texts]
    periods = routed_periods(model, tokenizer, cms, prompts, batch_size, max_length)
    rows = map_routed(cms, periods, list(texts),
                      lambda part: list(label_scores(model, tokenizer, template, part, labels, batch_size, max_length)))
    return (torch.stack(rows) if rows else torch.empty(0, len(labels))), periods


def routed_classify(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cms: ContinuumMemory, template: str,
                    texts: Sequence[str], labels: Sequence[str], batch_size: int, max_length: int
                    ) -> tuple[list[str], list[int] | None]:
    """Predict one of ``labels`` per text; with prototypes, each text in the view of its routed period.

    Returns the predictions and each text's routed period (None without prototypes).
    """
    scores, periods = routed_scores(model, tokenizer, cms, template, texts, labels, batch_size, max_length)
    return [labels[j] for j in scores.argmax(dim=1).tolist()], periods


__all__ = [
    "PROTOTYPE_KEYS",
    "Prototypes",
    "add_period",
    "compact",
    "feature_layer",
    "learn_prototypes",
    "map_routed",
    "period_view",
    "route",
    "routed_classify",
    "routed_periods",
    "routed_scores",
    "view_class",
    "sequence_features",
    "spherical_kmeans",
    "standardise",
]
