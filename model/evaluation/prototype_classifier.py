"""A baseline that keeps no raw data and trains no weight: the router's own statistics, used as the classifier.

A streaming linear discriminant over a frozen encoder (Hayes & Kanan, "Lifelong machine learning with deep
streaming linear discriminant analysis", 2020): each task adds, for each of its labels, the mean of the sentence
model's embedding (all-MiniLM-L6-v2) of its prompts, and its prompts' residuals around those means to one pooled
scatter (:func:`model.memory.prototypes.add_period`, the statistics sleep's router keeps). A text gets the seen label
whose mean is nearest in the metric of the pooled covariance shrunk towards the identity
(:func:`model.memory.prototypes.mahalanobis_scores`). Nothing of the language model is used, so it measures how much
of a stream an off-the-shelf encoder already separates (docs/results/issue13/routing-ceiling/).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from model.memory.prototypes import (SENTENCE_LAYER, Prototypes, add_period, mahalanobis_scores, sentence_features,
                                     standardise)


@dataclass
class PrototypeClassifier:
    """Label means and a pooled covariance of sentence embeddings; ``labels[i]`` is the label of centroid i."""

    shrinkage: float
    batch_size: int
    protos: Prototypes | None = None
    labels: list[str] = field(default_factory=list)

    def learn(self, prompts: Sequence[str], labels: Sequence[str], period: int, seed: int = 0) -> None:
        """Add task ``period``: a mean per label of its prompts' embeddings, its residuals into the scatter."""
        if len(prompts) != len(labels) or not prompts:
            raise ValueError(f"task {period}: {len(prompts)} prompts for {len(labels)} labels")
        self.learn_features(sentence_features(list(prompts), self.batch_size), labels, period, seed)

    def learn_features(self, feats: torch.Tensor, labels: Sequence[str], period: int, seed: int = 0) -> None:
        """:meth:`learn` from the prompts' embeddings (N, 384) already computed."""
        new = list(dict.fromkeys(str(lab) for lab in labels))
        if seen := [lab for lab in new if lab in self.labels]:
            raise ValueError(f"task {period}: labels {seen} were learned by an earlier task (class-incremental)")
        self.protos = add_period(self.protos, feats, period, 1, SENTENCE_LAYER, seed=seed, metric="mahalanobis",
                                 shrinkage=self.shrinkage, groups=[str(lab) for lab in labels])
        self.labels += new
        if self.protos.centroids.shape[0] != len(self.labels):
            raise RuntimeError(f"{self.protos.centroids.shape[0]} centroids for {len(self.labels)} labels")

    def predict(self, prompts: Sequence[str], candidates: Sequence[str]) -> list[str]:
        """The nearest candidate label of each prompt; every candidate must have been learned."""
        return self.predict_features(sentence_features(list(prompts), self.batch_size), candidates)

    def predict_features(self, feats: torch.Tensor, candidates: Sequence[str]) -> list[str]:
        """:meth:`predict` from the prompts' embeddings (N, 384) already computed."""
        if self.protos is None:
            raise ValueError("predict before any task was learned")
        if missing := [c for c in candidates if c not in self.labels]:
            raise ValueError(f"labels {missing} were never learned")
        z = standardise(feats, self.protos)  # (N, 384)
        scores = mahalanobis_scores(z, self.protos.centroids.float(), self.protos.whiten())  # (N, P)
        allowed = set(candidates)
        scores[:, torch.tensor([lab not in allowed for lab in self.labels])] = float("-inf")
        return [self.labels[i] for i in scores.argmax(dim=1).tolist()]
