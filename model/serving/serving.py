"""Using a trained model: load a state and ask it to classify or to write.

``load_state`` opens the base model of ``params.yaml`` with a state's memory levels
(model/memory/checkpoint.py, every checksum verified) and returns a :class:`TrainedModel`:

* ``predict`` answers exactly as evaluation does (class-incremental label log-likelihood
  with ``wake.template``, model/memory/wake.py; with prototype routing each text is answered by the
  experts of its routed period, model/memory/prototypes.py), and turns the label log-likelihoods
  into probabilities over the candidate labels (a softmax).
* ``generate`` writes with the sleep's batched decoder (model/decoding/sampling.py), every memory
  level on; with prototype routing each prompt is routed first and written in its period's
  view, as an input is answered in evaluation.

A state is a directory (``state/sleep/period-2``, anything model.memory.checkpoint.read_manifest
accepts) or a period number, meaning the sleep state ``<dream.state_dir>/period-N``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model.config import Params, load_params
from model.data.stream import PLAN_FILE, load_plan
from model.decoding.loading import LoadedModel
from model.decoding.sampling import sample_continuations
from model.errors import UserError
from model.memory.checkpoint import CheckpointError, open_memory_model, read_manifest
from model.memory.cms import ContinuumMemory
from model.memory.routed import map_routed, routed_periods, routed_scores


class ServingError(UserError, ValueError):
    """A request the model cannot answer (no candidate labels, bad arguments); the message says why."""


def resolve_state(state: int | str | Path, params: Params, root: Path) -> Path:
    """A state directory: ``state`` itself, or for a period number the sleep state of that period."""
    if isinstance(state, int):
        if state < 0:
            raise ServingError(f"period {state}: periods are numbered from 0")
        return root / params.dream.state_dir / f"period-{state}"
    return Path(state)


def state_period(manifest: dict[str, Any]) -> int:
    """The wake period a state has learned up to (the manifest's ``period``, else its metadata's)."""
    period = manifest.get("period", manifest["metadata"].get("period"))
    return int(period) if period is not None else 0


def state_labels(manifest: dict[str, Any], params: Params, root: Path, where: str | Path = "the state") -> list[str]:
    """The labels a state has seen: its metadata's ``labels`` when it records them, else the labels of
    tasks 0..its period in the stream plan (``<data.out_dir>/tasks.json``, or the inbox's open stream for an inbox
    period), each once, as evaluation has them."""
    labels = manifest["metadata"].get("labels")
    if labels:
        return [str(lab) for lab in labels]
    plan_path = root / params.data.out_dir / PLAN_FILE
    open_plan = root / params.lifecycle.state_root / params.intake.inbox / "stream" / PLAN_FILE
    if open_plan.is_file() and state_period(manifest) in load_plan(open_plan.parent):
        plan_path = open_plan  # an inbox period: the open stream (the prepared tasks, then the inbox's)
    if not plan_path.is_file():
        raise ServingError(f"{where}: records no labels and {plan_path} does not exist; pass the candidate labels "
                           "(--labels) or run prepare")
    plan = load_plan(plan_path.parent)
    period = state_period(manifest)
    missing = [t for t in range(period + 1) if t not in plan]
    if missing:
        raise ServingError(f"{plan_path}: has no task {missing[0]}, but {where} has learned periods 0..{period}")
    return list(dict.fromkeys(lab for t in range(period + 1) for lab in plan[t]))  # a label may come back later


@dataclass
class TrainedModel:
    """A base model with a state's memory levels, ready to answer."""

    params: Params
    root: Path
    state: Path
    manifest: dict[str, Any]
    loaded: LoadedModel
    cms: ContinuumMemory

    @property
    def period(self) -> int:
        return state_period(self.manifest)

    @property
    def labels(self) -> list[str]:
        """The default candidate labels: every label the state has seen (see :func:`state_labels`)."""
        return state_labels(self.manifest, self.params, self.root, self.state)

    def predict(self, texts: list[str], labels: list[str] | None = None, top_k: int = 3
                ) -> list[list[tuple[str, float]]]:
        """The ``top_k`` most likely labels of each text, best first, with their probability among ``labels``
        (default: every label the state has seen).

        The probabilities are the softmax of the label log-likelihoods, so over all candidates they sum to 1;
        the best label is the one evaluation predicts (model.memory.routed.routed_classify).
        """
        candidates = list(self.labels if labels is None else labels)
        if not candidates or any(not isinstance(c, str) or not c for c in candidates):
            raise ServingError(f"candidate labels must be non-empty strings, got {candidates!r}")
        if len(set(candidates)) != len(candidates):
            raise ServingError(f"candidate labels must be distinct, got {candidates!r}")
        if top_k < 1:
            raise ServingError(f"top_k must be >= 1, got {top_k}")
        if not texts:
            return []
        wake = self.params.wake
        try:
            scores, _ = routed_scores(self.loaded.model, self.loaded.tokenizer, self.cms, wake.template, texts,
                                      candidates, wake.eval_batch_size, wake.max_length)  # (N, C) log-likelihoods
        except ValueError as e:  # the scorer's checks: a label longer than wake.max_length, an empty prompt
            raise ServingError(str(e)) from None
        probs = scores.softmax(dim=1)
        # Stable order on the log-likelihoods: among equal scores the first label wins, as argmax picks it.
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :top_k]
        return [[(candidates[j], float(probs[i, j])) for j in row] for i, row in enumerate(order.tolist())]

    def generate(self, prompts: list[str], max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0) -> list[str]:
        """A continuation of every prompt (greedy at temperature 0), every memory level on; with prototype
        routing, each prompt in the view of the period its whole text routes to."""
        if not prompts:
            return []
        model, tok = self.loaded.model, self.loaded.tokenizer
        lengths = [len(ids) for ids in tok(list(prompts))["input_ids"]]
        if not min(lengths):
            raise ServingError(f"prompt {prompts[lengths.index(0)]!r} encodes to no tokens")
        # Route on every token of the prompt (no cut): what the exported model does at its first forward pass.
        periods = routed_periods(model, tok, self.cms, prompts, self.params.wake.eval_batch_size, max(lengths))
        sampling = self.params.sampling

        def write(part: list[str]) -> list[str]:
            samples = sample_continuations(model, tok, part, 1, max_new_tokens, temperature, top_p, seed,
                                           sampling.batch_size, dtype=sampling.compute_dtype)
            return [s.text for s in samples]

        try:
            return map_routed(self.cms, periods, list(prompts), write)
        except ValueError as e:  # the sampler's argument and prompt checks
            raise ServingError(str(e)) from None


def load_state(state: int | str | Path, params: str | Path | Params = "params.yaml",
               root: str | Path | None = None) -> TrainedModel:
    """The model of ``state`` (a state directory or a period number), with the base model of ``params``.

    ``root`` (default: the params file's directory) is where relative paths of params.yaml start.
    Raises CheckpointError for a missing or corrupt state, ConfigError for bad params.
    """
    if isinstance(params, Params):
        cfg, base = params, Path(".")
    else:
        cfg, base = load_params(params), Path(params).resolve().parent
    root = Path(root) if root is not None else base
    path = resolve_state(state, cfg, root)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such state directory")
    manifest = read_manifest(path)
    loaded, cms, _ = open_memory_model(cfg, root, path)
    return TrainedModel(cfg, root, path, manifest, loaded, cms)


__all__ = ["ServingError", "TrainedModel", "load_state", "resolve_state", "state_labels", "state_period"]
