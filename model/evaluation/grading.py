"""Automatic grading of short answers to questions asked without their passage (tau, docs/design.md §3, §5).

SEAL grades no-context SQuAD answers with an LLM judge; this project has no such
judge offline, so it grades with three automatic measures against the single
reference answer of each question:

* **Normalisation** (as in the official SQuAD v1.1 script): lowercase; delete every
  ASCII punctuation character (``string.punctuation``); delete the whole words
  ``a``, ``an`` and ``the``; split on whitespace and rejoin with single spaces.
  ``"The Beatles."`` and ``"beatles"`` both become ``"beatles"``.
* **Exact match (em)**: 1.0 if the normalised prediction equals the normalised
  reference, else 0.0. This is the strict notion of "correct".
* **Token F1 (f1)**: the harmonic mean of precision and recall of the normalised
  tokens, counted as multisets (SQuAD's token F1). Partial credit for answers that
  overlap the reference. If both normalise to no tokens the score is 1.0; if only one
  does, 0.0.
* **Semantic match (semantic)**, only when a :class:`~model.sleep.rewards.SemanticJudge`
  (all-MiniLM-L6-v2) is given: 1.0 if the answer is an exact match, 0.0 if the
  prediction normalises to nothing (while the reference does not), otherwise 1.0 iff
  the cosine similarity of the embeddings of the two stripped, unnormalised strings
  is at least the threshold. It accepts paraphrases such as "Germans from the
  Baltic" for "Baltic Germans" that EM rejects. Without a judge it is None.

Accuracy over a set of questions is the mean of one of these per-question scores.
Its uncertainty is reported with :func:`mean_ci95` (normal approximation; used for
accuracies over many questions, e.g. the 974 of the eval set) or
:func:`bootstrap_ci95` (percentile bootstrap; used for few values or skewed ones,
such as per-passage changes in accuracy over a handful of passages).
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    from model.sleep.rewards import SemanticJudge

Metric = Literal["em", "f1", "semantic"]
METRICS: tuple[str, ...] = ("em", "f1", "semantic")

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation, drop articles a/an/the, collapse whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match(pred: str, gold: str) -> float:
    """1.0 if the two answers are equal after :func:`normalize_answer`, else 0.0."""
    return float(normalize_answer(pred) == normalize_answer(gold))


def token_f1(pred: str, gold: str) -> float:
    """SQuAD token F1 over normalised tokens; both empty -> 1.0, exactly one empty -> 0.0."""
    p = normalize_answer(pred).split()
    g = normalize_answer(gold).split()
    if not p or not g:
        return float(p == g)
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


@dataclass(frozen=True)
class GradeResult:
    """Scores of one answer: em and semantic are 0/1, f1 in [0, 1]; semantic is None without a judge."""

    em: float
    f1: float
    semantic: float | None = None


def grade(
    preds: Sequence[str],
    golds: Sequence[str],
    judge: SemanticJudge | None = None,
    threshold: float | None = None,
) -> list[GradeResult]:
    """Grade each prediction against its reference answer (N, N -> N results).

    ``threshold`` is the cosine at which the judge counts a pair as the same meaning;
    None uses the judge's own ``threshold``. The judge embeds only the pairs that
    are neither exact matches nor empty predictions.
    """
    if len(preds) != len(golds):
        raise ValueError(f"{len(preds)} predictions but {len(golds)} reference answers")
    if threshold is not None and judge is None:
        raise ValueError("a semantic threshold was given but no judge to apply it")
    if threshold is not None and not -1.0 <= threshold <= 1.0:
        raise ValueError(f"cosine threshold must be in [-1, 1], got {threshold}")
    ems = [exact_match(p, g) for p, g in zip(preds, golds)]
    f1s = [token_f1(p, g) for p, g in zip(preds, golds)]
    if judge is None:
        return [GradeResult(em, f1) for em, f1 in zip(ems, f1s)]
    cut = judge.threshold if threshold is None else threshold
    semantic = [1.0 if em == 1.0 else 0.0 for em in ems]
    ask = [i for i, (em, p) in enumerate(zip(ems, preds)) if em == 0.0 and normalize_answer(p)]
    if ask:
        cosines = judge.cosine([preds[i].strip() for i in ask], [golds[i].strip() for i in ask])
        for i, cos in zip(ask, cosines):
            semantic[i] = 1.0 if cos >= cut else 0.0
    return [GradeResult(em, f1, sem) for em, f1, sem in zip(ems, f1s, semantic)]


def metric_values(results: Sequence[GradeResult], metric: Metric = "em") -> list[float]:
    """The per-answer scores of one metric, e.g. to feed :func:`mean_ci95`."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    values = [getattr(r, metric) for r in results]
    if metric == "semantic" and any(v is None for v in values):
        raise ValueError("metric 'semantic' needs results graded with a judge (SemanticJudge); got None")
    return values


def accuracy(results: Sequence[GradeResult], metric: Metric = "em") -> float:
    """Mean of one metric over the answers (for f1: mean token F1)."""
    if not results:
        raise ValueError("no graded answers to average")
    values = metric_values(results, metric)
    return sum(values) / len(values)


def mean_ci95(values: Sequence[float]) -> tuple[float, float, float]:
    """(mean, low, high): mean +- 1.96 * sample std (ddof=1) / sqrt(n); one value gives (x, x, x).

    The normal approximation suits means over many values (tens or more).
    """
    x = _as_array(values)
    mean = float(x.mean())
    if len(x) == 1:
        return mean, mean, mean
    half = 1.96 * float(x.std(ddof=1)) / math.sqrt(len(x))
    return mean, mean - half, mean + half


def bootstrap_ci95(values: Sequence[float], n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): percentile bootstrap, the 2.5% and 97.5% quantiles of resampled means.

    Resamples n values with replacement ``n_boot`` times (seeded, so repeatable). It
    makes no normality assumption, so it suits few or skewed values.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    x = _as_array(values)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(axis=1)  # (n_boot,)
    low, high = np.quantile(means, [0.025, 0.975])
    return float(x.mean()), float(low), float(high)


def _as_array(values: Sequence[float]) -> np.ndarray:
    """Values as a float64 vector; empty or non-finite input is an error."""
    x = np.asarray(list(values), dtype=np.float64)
    if x.ndim != 1 or len(x) == 0:
        raise ValueError("a confidence interval needs at least one value")
    if not np.isfinite(x).all():
        raise ValueError("a confidence interval needs finite values")
    return x
