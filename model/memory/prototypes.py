"""Prototype routing: which experts fire for an input, decided from the whole input (``cms.routing.by_prototype``).

Each wake period leaves prototypes of where its inputs lie, a feature being the mean over the
prompt's tokens of the residual stream entering decoder layer ``feature_layer`` (at or below
the first CMS layer, so no memory level ever changes it, and a prototype stays valid for the
model's whole life). Two metrics (``cms.routing.metric``):

- ``mahalanobis`` (default): one prototype per label of the period (the mean of its inputs'
  standardised features; K-means clusters for unlabelled passages), and one covariance shared
  by every period, pooled from the residuals of each period's inputs around their own
  prototype and shrunk towards a multiple of the identity (:func:`shared_covariance`). An
  input goes to the prototype nearest in that covariance's metric (:func:`mahalanobis_route`),
  a linear discriminant over everything the model has seen. On the development streams it
  cut the inputs routed to the wrong period by three quarters (bench/routing_probe.py: 4.2% ->
  1.1% of them over 3 tasks, 8.3% -> 2.0% over 5, against cosine with K = 16).
- ``cosine``: K spherical k-means centroids per period, nearest by cosine (:func:`cosine_route`).

When the model answers an input, the input's nearest prototype names a period p,
and only experts of periods <= p fire (every expert records the period it learned last,
model/memory/cms.py): the model answers an old task's input with the experts it had when it
learned that task, and a later expert cannot override it. Prototypes and the pooled scatter
are statistics of the model's own states (means and second moments of hidden states), not
stored examples.

Applied where the model answers (model/memory/routed.py): classification and evaluation, model/serving/serving.py's predict and
generate, the exported model (model/serving/export.py). Training and the sleep's sampling run with every
expert of the current period on. The routing loss (model/memory/routing.py) is the other, learned,
mechanism; it is off by default.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from model.decoding.forward import prefix_hidden
from model.memory.cms import CMSError, ContinuumMemory

Metric = Literal["cosine", "mahalanobis"]
BASE_KEYS = ("routing.mean", "routing.scale", "routing.centroids", "routing.periods", "routing.layer")
MAHALANOBIS_KEYS = ("routing.scatter", "routing.count", "routing.shrinkage", "routing.pooled_periods")
PROTOTYPE_KEYS = BASE_KEYS + MAHALANOBIS_KEYS  # every tensor of a state's routing (the last four: mahalanobis only)


@dataclass
class Prototypes:
    """Where each period's inputs lie, at decoder layer ``layer``.

    mean, scale: (d,) standardisation fixed by the first period's features;
    centroids: (P, d); periods: (P,) the period of each centroid. Cosine: unit centroids, K per period.
    Mahalanobis (``scatter`` set): one centroid per label (or K-means cluster) of each period, and the
    pooled scatter (d, d) of ``count`` standardised features around their own centroid, from the periods
    ``pooled_periods``; ``shrinkage`` is the covariance's weight on the identity (:func:`shared_covariance`).
    """

    layer: int
    mean: torch.Tensor
    scale: torch.Tensor
    centroids: torch.Tensor
    periods: torch.Tensor
    scatter: torch.Tensor | None = None
    count: int = 0
    shrinkage: float = 0.0
    pooled_periods: torch.Tensor | None = None
    _whiten: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def metric(self) -> Metric:
        return "cosine" if self.scatter is None else "mahalanobis"

    def whiten(self) -> torch.Tensor:
        """W (d, d) with W Sigma W^T = I for the shared covariance (cached): Mahalanobis distance = |W(x - c)|."""
        if self.scatter is None:
            raise CMSError("cosine prototypes have no covariance to whiten with")
        if self._whiten is None:
            self._whiten = whitening(shared_covariance(self.scatter, self.count, self.shrinkage))
        return self._whiten

    def to_tensors(self) -> dict[str, torch.Tensor]:
        out = {"routing.mean": self.mean, "routing.scale": self.scale, "routing.centroids": self.centroids,
               "routing.periods": self.periods, "routing.layer": torch.tensor([self.layer])}
        if self.scatter is not None:
            assert self.pooled_periods is not None
            out.update({"routing.scatter": self.scatter, "routing.count": torch.tensor([self.count]),
                        "routing.shrinkage": torch.tensor([self.shrinkage], dtype=torch.float64),
                        "routing.pooled_periods": self.pooled_periods})
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], where: str) -> "Prototypes":
        missing = [k for k in BASE_KEYS if k not in tensors]
        maha = [k for k in MAHALANOBIS_KEYS if k in tensors]
        if maha and len(maha) != len(MAHALANOBIS_KEYS):
            missing += [k for k in MAHALANOBIS_KEYS if k not in tensors]
        if missing:
            raise CMSError(f"{where}: routing tensors {missing} missing")
        c, per = tensors["routing.centroids"].float(), tensors["routing.periods"].long()
        mean, scale = tensors["routing.mean"].float(), tensors["routing.scale"].float()
        if c.ndim != 2 or per.shape != (c.shape[0],) or mean.shape != (c.shape[1],) or scale.shape != mean.shape:
            raise CMSError(f"{where}: routing tensors have inconsistent shapes (centroids {tuple(c.shape)}, "
                           f"periods {tuple(per.shape)}, mean {tuple(mean.shape)}, scale {tuple(scale.shape)})")
        protos = cls(int(tensors["routing.layer"][0]), mean, scale, c, per)
        if maha:
            scatter, count = tensors["routing.scatter"].double(), int(tensors["routing.count"][0])
            shrinkage = float(tensors["routing.shrinkage"][0])
            if scatter.shape != (c.shape[1], c.shape[1]) or count < 1 or not 0.0 < shrinkage <= 1.0:
                raise CMSError(f"{where}: routing tensor 'routing.scatter' has shape {tuple(scatter.shape)} for "
                               f"{c.shape[1]} features, count {count}, shrinkage {shrinkage} (want (d, d), >= 1, (0, 1])")
            protos.scatter, protos.count, protos.shrinkage = scatter, count, shrinkage
            protos.pooled_periods = tensors["routing.pooled_periods"].long()
        return protos


#: The routing feature's "layer" when it is the sentence model's embedding (``cms.routing.feature: sentence``).
SENTENCE_LAYER = -1
#: Its dimension (all-MiniLM-L6-v2).
SENTENCE_DIM = 384


def sentence_features(prompts: Sequence[str], batch_size: int, device: str = "cpu") -> torch.Tensor:
    """The frozen sentence model's embedding of each prompt (all-MiniLM-L6-v2, mean-pooled, unit rows): (N, 384).

    The model the semantic reward loads (model/sleep/rewards.py), from its PyPI package, once per process.
    Raises RewardModelNotFoundError, with the install command, when it is not installed.
    """
    from model.sleep.rewards import _load_sentence_model, minilm_dir

    encoder = _load_sentence_model(str(minilm_dir()), device)
    with torch.no_grad():
        emb = encoder.encode(list(prompts), batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=True,
                             show_progress_bar=False)
    return emb.float().cpu()


@torch.no_grad()
def sequence_features(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                      layer: int, batch_size: int, max_length: int) -> torch.Tensor:
    """Mean over each prompt's tokens of the residual stream entering decoder layer ``layer``: (N, d); for
    ``layer`` = SENTENCE_LAYER, the sentence model's embedding (:func:`sentence_features`), (N, 384).

    Right padding under a causal mask: a prompt's tokens never see the padding after them.
    """
    if not prompts:
        raise ValueError("sequence_features: no prompts")
    if layer == SENTENCE_LAYER:
        return sentence_features(prompts, batch_size, str(model.device))
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


def kmeans(x: torch.Tensor, k: int, iters: int = 25, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean k-means of rows x (N, d): centroids (k, d) and each row's cluster (N,); k is cut to N."""
    k = min(k, x.shape[0])
    gen = torch.Generator().manual_seed(seed)
    c = x[torch.randperm(x.shape[0], generator=gen)[:k]].clone()
    for _ in range(iters):
        assign = torch.cdist(x, c).argmin(dim=1)
        total = torch.zeros_like(c).index_add_(0, assign, x)
        n = torch.bincount(assign, minlength=k).to(x.dtype)
        new = torch.where((n > 0)[:, None], total / n.clamp(min=1)[:, None], c)  # an empty cluster keeps its centroid
        if torch.equal(new, c):
            break
        c = new
    return c, torch.cdist(x, c).argmin(dim=1)


def shared_covariance(scatter: torch.Tensor, count: int, shrinkage: float) -> torch.Tensor:
    """Sigma = (1 - lambda) S / n + lambda (tr(S / n) / d) I: the pooled within-prototype covariance, shrunk.

    scatter S (d, d): sum over every pooled input of (z - c)(z - c)^T, c its own prototype; count n.
    With n well below d (100 inputs a period, d = 576 here) S / n is singular; lambda > 0 keeps Sigma
    positive definite and trusts the directions the data measured only as far as lambda allows.
    """
    d = scatter.shape[0]
    cov = scatter.double() / max(count, 1)
    return (1.0 - shrinkage) * cov + shrinkage * (cov.trace() / d) * torch.eye(d, dtype=torch.float64)


def whitening(cov: torch.Tensor) -> torch.Tensor:
    """W = L^-1 for Sigma = L L^T (d, d), float32: |W v|^2 = v^T Sigma^-1 v."""
    chol = torch.linalg.cholesky(cov.double())
    return torch.linalg.solve_triangular(chol, torch.eye(cov.shape[0], dtype=torch.float64), upper=False).float()


def standardise(features: torch.Tensor, protos: Prototypes) -> torch.Tensor:
    """Features (N, d) -> unit rows (N, d) in the prototypes' standardised space."""
    return F.normalize((features.float() - protos.mean) / protos.scale, dim=1)


def add_period(protos: Prototypes | None, features: torch.Tensor, period: int, k: int, layer: int,
               seed: int = 0, *, metric: Metric = "cosine", shrinkage: float = 0.5,
               groups: Sequence[Hashable | None] | None = None) -> Prototypes:
    """The prototypes with ``period``'s (re)placed, from its inputs' features (N, d).

    The first period's features fix the standardisation (per-dimension mean and spread) and the metric.
    Cosine: K spherical k-means centroids. Mahalanobis: one centroid per group (``groups``: each input's
    label, None for an unlabelled one; the unlabelled ones form K k-means clusters), and the inputs'
    residuals around their centroids join the pooled scatter. A period's residuals are pooled once: a
    period already pooled cannot be added again (its wake starts from the state before it).
    """
    features = features.float()
    if protos is None:
        mean, scale = features.mean(0), features.std(0, unbiased=False) + 1e-3
        d = features.shape[1]
        protos = Prototypes(layer, mean, scale, torch.empty(0, d), torch.empty(0, dtype=torch.long))
        if metric == "mahalanobis":
            protos.scatter, protos.shrinkage = torch.zeros(d, d, dtype=torch.float64), float(shrinkage)
            protos.pooled_periods = torch.empty(0, dtype=torch.long)
    elif protos.layer != layer:
        raise CMSError(f"cms.routing is set to route by {_feature_name(layer)} but the state's prototypes were made "
                       f"with {_feature_name(protos.layer)} (a state keeps the feature it started with: set "
                       "cms.routing.feature and feature_layer back to go on from it)")
    if protos.metric != metric:
        raise CMSError(f"cms.routing.metric is {metric} but the state's prototypes were made with {protos.metric} "
                       f"(set cms.routing.metric: {protos.metric} to go on from this state)")
    z = standardise(features, protos)
    keep = protos.periods != period
    def with_period(cent: torch.Tensor, **pooled) -> Prototypes:
        return dataclasses.replace(protos, centroids=torch.cat([protos.centroids[keep], cent]), periods=torch.cat(
            [protos.periods[keep], torch.full((cent.shape[0],), period, dtype=torch.long)]), **pooled)

    if metric == "cosine":
        return with_period(spherical_kmeans(z, k, seed=seed))
    assert protos.scatter is not None and protos.pooled_periods is not None
    if period in protos.pooled_periods.tolist():
        raise CMSError(f"period {period}: its inputs are already in the routing covariance; a period's prototypes "
                       "are learned once, by the wake that starts from the state before it")
    if groups is not None and len(groups) != z.shape[0]:
        raise ValueError(f"add_period: {len(groups)} groups for {z.shape[0]} features")
    cent, resid = group_centroids(z, groups, k, seed)
    return with_period(cent, scatter=protos.scatter + resid.double().T @ resid.double(), count=protos.count + z.shape[0],
                       pooled_periods=torch.cat([protos.pooled_periods, torch.tensor([period])]), _whiten=None)


def group_centroids(z: torch.Tensor, groups: Sequence[Hashable | None] | None, k: int, seed: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Centroids (G, d) of unit features z (N, d): each labelled group's mean (in order of first appearance),
    then K k-means clusters of the unlabelled rows; and each row's residual from its own centroid (N, d)."""
    keys = [None] * z.shape[0] if groups is None else list(groups)
    cents, resid = [], torch.empty_like(z)
    for key in dict.fromkeys(g for g in keys if g is not None):
        idx = torch.tensor([i for i, g in enumerate(keys) if g == key])
        c = z[idx].mean(0, keepdim=True)
        cents.append(c)
        resid[idx] = z[idx] - c
    free = torch.tensor([i for i, g in enumerate(keys) if g is None], dtype=torch.long)
    if free.numel():
        c, assign = kmeans(z[free], k, seed=seed)
        cents.append(c)
        resid[free] = z[free] - c[assign]
    return torch.cat(cents), resid


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
    (model/memory/merging.py) are what makes old periods share a view.
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
            if protos.metric == "cosine":
                group = spherical_kmeans(group, k, seed=seed * 1_009 + rep)
            elif group.shape[0] > k:  # k-means in the whitened space (the metric routing measures in), and back
                w = protos.whiten()
                group = kmeans(group @ w.T, k, seed=seed * 1_009 + rep)[0] @ torch.linalg.inv(w.double()).float().T
        cents.append(group)
        pers.append(torch.full((group.shape[0],), rep, dtype=torch.long))
    return dataclasses.replace(protos, centroids=torch.cat(cents), periods=torch.cat(pers))  # the same covariance


def cosine_route(z: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of each input's most similar centroid: unit z (N, d), unit centroids (P, d) -> (N,)."""
    return (z @ centroids.T).argmax(dim=1)


def mahalanobis_scores(z: torch.Tensor, centroids: torch.Tensor, whiten: torch.Tensor) -> torch.Tensor:
    """|W z|^2 - |W (z - c_p)|^2 for every input and centroid: z (N, d), centroids (P, d), whiten W (d, d) -> (N, P).

    Computed as 2 (Wz).(Wc_p) - |Wc_p|^2; the larger, the nearer in the shared covariance's metric.
    """
    y, c = z @ whiten.T, centroids @ whiten.T  # (N, d), (P, d)
    return 2.0 * y @ c.T - (c * c).sum(dim=1)


def mahalanobis_route(z: torch.Tensor, centroids: torch.Tensor, whiten: torch.Tensor) -> torch.Tensor:
    """Index of each input's nearest centroid in the shared covariance's metric, argmin_p |W (z - c_p)|^2:
    the argmax of :func:`mahalanobis_scores`, (N,)."""
    return mahalanobis_scores(z, centroids, whiten).argmax(dim=1)


def route(protos: Prototypes, features: torch.Tensor) -> torch.Tensor:
    """The period of each input's nearest prototype (by the prototypes' metric): (N,) long."""
    z = standardise(features, protos)
    if protos.metric == "cosine":
        return protos.periods[cosine_route(z, protos.centroids)]
    return protos.periods[mahalanobis_route(z, protos.centroids.float(), protos.whiten())]


def _feature_name(layer: int) -> str:
    return "the sentence model's embedding" if layer == SENTENCE_LAYER else f"decoder layer {layer}'s input"


def feature_layer(cms: ContinuumMemory, layer: int | None, feature: str = "decoder") -> int:
    """The decoder layer whose input is the routing feature: ``layer``, or a quarter of the depth by default;
    SENTENCE_LAYER when ``feature`` is ``sentence`` (a model outside the LM: no memory level changes it either).

    A decoder layer must lie at or below the first CMS layer, so that no memory level changes the features.
    """
    if feature == "sentence":
        if layer is not None:
            raise CMSError(f"cms.routing.feature_layer is {layer}, but feature 'sentence' reads no decoder layer")
        return SENTENCE_LAYER
    if feature != "decoder":
        raise CMSError(f"cms.routing.feature must be 'decoder' or 'sentence', got {feature!r}")
    n_layers = len(cms.base_model[0].get_decoder().layers)
    chosen = n_layers // 4 if layer is None else layer
    if not 0 <= chosen <= cms.layer_ids[0]:
        raise CMSError(f"cms.routing.feature_layer: {chosen} must be within 0..{cms.layer_ids[0]} (the first CMS "
                       f"layer; the model has {n_layers} decoder layers), so that memory never changes the features")
    return chosen


def learn_prototypes(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cms: ContinuumMemory,
                     prompts: Sequence[str], period: int, layer: int | None, k: int, batch_size: int, max_length: int,
                     seed: int = 0, *, metric: Metric = "cosine", shrinkage: float = 0.5,
                     groups: Sequence[Hashable | None] | None = None, feature: str = "decoder") -> Prototypes:
    """Wake: ``period``'s prototypes from its prompts (``groups``: each prompt's label, None for a passage),
    into ``cms.prototypes`` (returned). ``feature``: ``decoder`` (layer ``layer``) or ``sentence``."""
    at = feature_layer(cms, layer, feature)
    feats = sequence_features(model, tokenizer, prompts, at, batch_size, max_length)
    added = add_period(cms.prototypes, feats, period, k, at, seed=seed, metric=metric, shrinkage=shrinkage,
                       groups=groups)
    cms.prototypes = compact(added, cms, k, seed=seed)
    return cms.prototypes


__all__ = [
    "BASE_KEYS",
    "MAHALANOBIS_KEYS",
    "PROTOTYPE_KEYS",
    "Prototypes",
    "SENTENCE_DIM",
    "SENTENCE_LAYER",
    "add_period",
    "compact",
    "cosine_route",
    "group_centroids",
    "kmeans",
    "mahalanobis_route",
    "mahalanobis_scores",
    "shared_covariance",
    "whitening",
    "feature_layer",
    "learn_prototypes",
    "route",
    "view_class",
    "sentence_features",
    "sequence_features",
    "spherical_kmeans",
    "standardise",
]
