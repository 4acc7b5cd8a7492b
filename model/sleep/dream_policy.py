"""The dream policy: the generator's own low-rank adapter, trained by ReST-EM across sleeps (issue #14;
docs/design.md §3, "The dream policy").

SEAL trains the model that writes self-edits, by ReST-EM over many passages, and then applies
it to passages it never saw. Here the generator is the base model plus a LoRA adapter of its
own on every decoder layer's ``targets`` projections::

    y = W x + (alpha / r) * B (A x)        A: (r, d_in), B: (d_out, r), B = 0 when fresh

The adapter is *on* only while dreams are sampled (:meth:`DreamPolicy.active`) and while a
ReST-EM update trains it (:func:`rest_em_update`); the memory levels that answer questions,
the isolated trials and every evaluation run with it off, so it changes what the model
dreams, never what it knows. It is a forward hook on each target ``nn.Linear`` (the hooks
survive the trials wrapping the same layers), and its tensors are not parameters of the model.

It is part of the memory state (``dream_policy.json`` + ``dream_policy.safetensors`` in the
state directory, checksummed, :func:`save_policy` / :func:`load_policy`), so a sleep's ReST-EM
update writes the next sleep's dreams; a trained policy is a directory of the same two files.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from model.config import DreamPolicyConfig
from model.errors import UserError
from model.io import atomic_dir, sha256_bytes, sha256_file
from model.sleep.sft import train_on_pairs

POLICY_FORMAT = 1
POLICY_JSON = "dream_policy.json"
POLICY_TENSORS = "dream_policy.safetensors"
POLICY_FILES = (POLICY_JSON, POLICY_TENSORS)


class DreamPolicyError(UserError, ValueError):
    """A dream policy that cannot be used (missing, corrupt, another base model or shape); names the file."""


def policy_targets(model: nn.Module, targets: Sequence[str]) -> list[tuple[str, nn.Linear]]:
    """Every ``nn.Linear`` of the decoder layers whose name ends in one of ``targets``, in module order."""
    from model.memory.cms import decoder_layers

    layers = decoder_layers(model)
    found = []
    for i, layer in enumerate(layers):
        for name, mod in layer.named_modules():
            if isinstance(mod, nn.Linear) and name.split(".")[-1] in targets:
                found.append((f"layers.{i}.{name}", mod))
    if not found:
        raise DreamPolicyError(f"dream.policy.targets: none of {list(targets)} is a linear layer of the decoder layers")
    return found


class DreamPolicy:
    """The generator's LoRA adapter (see the module docstring); off unless :meth:`active`.

    ``rounds`` counts the ReST-EM updates it has had and ``history`` says where each came from
    (a sleep's period, a training round), both saved with it. ``base_model`` is the name of the
    model it was made for: its deltas mean nothing on another one.
    """

    def __init__(self, model: nn.Module, cfg: DreamPolicyConfig, base_model: str, seed: int = 0) -> None:
        self.cfg = cfg
        self.base_model = base_model
        self.scale = cfg.alpha / cfg.rank
        self.rounds = 0
        self.history: list[str] = []
        self._on = False
        gen = torch.Generator().manual_seed(seed)
        self.names: list[str] = []
        self.A: list[nn.Parameter] = []
        self.B: list[nn.Parameter] = []
        self._hooks = []
        for name, lin in policy_targets(model, cfg.targets):
            w = lin.weight
            bound = 1.0 / math.sqrt(lin.in_features)  # kaiming-uniform(a=sqrt(5)), as PEFT initialises lora_A
            a = (torch.rand(cfg.rank, lin.in_features, generator=gen) * 2 - 1) * bound
            self.names.append(name)
            self.A.append(nn.Parameter(a.to(device=w.device, dtype=torch.float32)))
            self.B.append(nn.Parameter(torch.zeros(lin.out_features, cfg.rank, device=w.device)))
            self._hooks.append(lin.register_forward_hook(self._hook(len(self.A) - 1)))

    def _hook(self, i: int):
        def add_delta(_mod: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor | None:
            if not self._on:
                return None
            x = inputs[0].to(self.A[i].dtype)
            return out + (self.scale * (x @ self.A[i].t()) @ self.B[i].t()).to(out.dtype)
        return add_delta

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Within: the adapter adds its delta (dream sampling, a ReST-EM update)."""
        was, self._on = self._on, True
        try:
            yield
        finally:
            self._on = was

    def parameters(self) -> list[nn.Parameter]:
        return [*self.A, *self.B]

    def is_fresh(self) -> bool:
        """True while every B is zero: the adapter adds nothing (an untrained policy)."""
        return all(not bool(b.detach().any()) for b in self.B)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for n, a, b in zip(self.names, self.A, self.B):
            out[f"{n}.A"] = a.detach().cpu().contiguous().clone()
            out[f"{n}.B"] = b.detach().cpu().contiguous().clone()
        return out

    def digest(self) -> str:
        """SHA-256 over every A and B (fp32 bytes, in module order)."""
        return sha256_bytes(b"".join(t.to(torch.float32).numpy().tobytes() for t in self.to_tensors().values()))

    def load_from(self, other: "DreamPolicy") -> None:
        """Take ``other``'s weights, rounds and history (the same layout: another copy of the same model)."""
        if other.names != self.names or [a.shape for a in other.A] != [a.shape for a in self.A]:
            raise DreamPolicyError("dream policy: another layout of adapters (rank or targets differ)")
        with torch.no_grad():
            for mine, theirs in zip(self.parameters(), other.parameters()):
                mine.copy_(theirs)
        self.rounds, self.history = other.rounds, list(other.history)

    def snapshot(self) -> dict[str, torch.Tensor]:
        """A copy of the weights (with :meth:`restore`: start every passage from the same policy)."""
        return {str(i): p.detach().clone() for i, p in enumerate(self.parameters())}

    def restore(self, snap: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for i, p in enumerate(self.parameters()):
                p.copy_(snap[str(i)])
                p.grad = None

    def remove(self) -> None:
        """Take the hooks off the model (the policy is gone from every forward pass)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def describe(self) -> dict[str, Any]:
        return {"format_version": POLICY_FORMAT, "base_model": self.base_model, "rank": self.cfg.rank,
                "alpha": self.cfg.alpha, "targets": list(self.cfg.targets), "n_adapters": len(self.names),
                "rounds": self.rounds, "history": list(self.history)}


def attach_policy(model: nn.Module, cfg: DreamPolicyConfig, base_model: str, seed: int = 0) -> DreamPolicy:
    """A fresh policy (B = 0) hooked onto ``model``'s target layers."""
    return DreamPolicy(model, cfg, base_model, seed)


def write_policy_files(policy: DreamPolicy, directory: Path) -> dict[str, str]:
    """Write the two policy files into ``directory`` (already a temporary one); returns {file: sha256}."""
    from safetensors.torch import save_file

    save_file(policy.to_tensors(), str(directory / POLICY_TENSORS))
    meta = {**policy.describe(), "sha256": policy.digest(), "tensors_sha256": sha256_file(directory / POLICY_TENSORS)}
    (directory / POLICY_JSON).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return {name: sha256_file(directory / name) for name in POLICY_FILES}


def save_policy(policy: DreamPolicy, dest: str | Path) -> Path:
    """A policy on its own (a trained one): ``dest``/dream_policy.{json,safetensors}, written atomically."""
    dest = Path(dest)
    with atomic_dir(dest) as tmp:
        write_policy_files(policy, tmp)
    return dest


def read_policy(src: str | Path, base_model: str, cfg: DreamPolicyConfig) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read and check a policy directory; nothing is loaded anywhere yet. Returns (description, tensors).

    A missing file, a checksum that does not match, a policy of another base model or of
    another rank/targets than ``cfg`` is a DreamPolicyError naming the file and the field.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    src = Path(src)
    jpath, tpath = src / POLICY_JSON, src / POLICY_TENSORS
    for path in (jpath, tpath):
        if not path.is_file():
            raise DreamPolicyError(f"{path}: missing (not a dream policy directory)")
    try:
        meta = json.loads(jpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DreamPolicyError(f"{jpath}: not valid JSON: {e}") from None
    if not isinstance(meta, dict):
        raise DreamPolicyError(f"{jpath}: must be an object")
    for key in ("format_version", "base_model", "rank", "targets", "rounds", "history", "sha256", "tensors_sha256"):
        if key not in meta:
            raise DreamPolicyError(f"{jpath}: field '{key}' missing")
    if meta["format_version"] != POLICY_FORMAT:
        raise DreamPolicyError(f"{jpath}: field 'format_version' is {meta['format_version']}, expected {POLICY_FORMAT}")
    if meta["base_model"] != base_model:
        raise DreamPolicyError(f"{jpath}: field 'base_model' is {meta['base_model']!r}, but this project's base model "
                               f"is {base_model!r}: a policy of another base model")
    if meta["rank"] != cfg.rank or list(meta["targets"]) != list(cfg.targets):
        raise DreamPolicyError(f"{jpath}: field 'rank'/'targets' ({meta['rank']}, {meta['targets']}) differ from "
                               f"params' dream.policy ({cfg.rank}, {list(cfg.targets)})")
    if sha256_file(tpath) != meta["tensors_sha256"]:
        raise DreamPolicyError(f"{tpath}: checksum mismatch with {POLICY_JSON} (file corrupted or modified)")
    try:
        tensors = load_file(str(tpath))
    except (SafetensorError, OSError, ValueError) as e:
        raise DreamPolicyError(f"{tpath}: not a readable safetensors file ({str(e).splitlines()[0][:120]})") from None
    return meta, tensors


def check_policy_tensors(policy: DreamPolicy, meta: dict[str, Any], tensors: dict[str, torch.Tensor], where: Path) -> None:
    """Names, shapes and digest of read tensors against ``policy`` (DreamPolicyError naming ``where``)."""
    want = {f"{n}.{ab}": p.shape for n, a, b in zip(policy.names, policy.A, policy.B) for ab, p in (("A", a), ("B", b))}
    if set(tensors) != set(want):
        missing, extra = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
        raise DreamPolicyError(f"{where}: tensor names differ (missing {missing[:3]}, unexpected {extra[:3]})")
    for k, t in tensors.items():
        if tuple(t.shape) != tuple(want[k]):
            raise DreamPolicyError(f"{where}: tensor '{k}' has shape {tuple(t.shape)}, expected {tuple(want[k])}")
    digest = sha256_bytes(b"".join(tensors[k].to(torch.float32).numpy().tobytes()
                                   for n in policy.names for k in (f"{n}.A", f"{n}.B")))
    if digest != meta["sha256"]:
        raise DreamPolicyError(f"{where}: field 'sha256' does not match the weights")


def copy_policy_tensors(policy: DreamPolicy, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Copy tensors that passed :func:`check_policy_tensors` into ``policy``, with its rounds and history."""
    with torch.no_grad():
        for n, a, b in zip(policy.names, policy.A, policy.B):
            a.copy_(tensors[f"{n}.A"])
            b.copy_(tensors[f"{n}.B"])
    policy.rounds = int(meta["rounds"])
    policy.history = [str(h) for h in meta["history"]]


def load_policy(policy: DreamPolicy, src: str | Path) -> dict[str, Any]:
    """Load a policy directory into ``policy`` after every check of :func:`read_policy`; returns its description."""
    meta, tensors = read_policy(src, policy.base_model, policy.cfg)
    check_policy_tensors(policy, meta, tensors, Path(src) / POLICY_TENSORS)
    copy_policy_tensors(policy, meta, tensors)
    return meta


def rest_em_update(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    policy: DreamPolicy,
    prompts: Sequence[str],
    dreams: Sequence[str],
    steps: int,
    max_length: int,
    origin: str,
    batch_size: int | None = None,
    seed: int = 0,
) -> list[float]:
    """ReST-EM's M-step on the policy: SFT of the adapter on (dream prompt -> rewarded dream), adapter on.

    Only the policy's tensors move (the model's own and the memory levels' are frozen for the
    update). With ``batch_size`` each step trains on a minibatch of that many pairs, in an order
    shuffled by ``seed`` (a round's rewarded dreams can be many; one batch of them all does not fit in
    memory). ``origin`` joins the policy's history; returns the losses.
    """
    if not prompts or steps == 0:
        return []
    if batch_size is not None:  # minibatches in a seeded order, not the order the passages were dreamt in
        order = random.Random(seed).sample(range(len(prompts)), len(prompts))
        prompts, dreams = [prompts[i] for i in order], [dreams[i] for i in order]
    with policy.active():
        losses = train_on_pairs(model, tokenizer, policy.parameters(), prompts, dreams, steps, policy.cfg.lr, max_length,
                                batch_size)
    for p in policy.parameters():
        p.grad = None
    policy.rounds += 1
    policy.history.append(f"{origin}: {len(prompts)} dreams, {steps} steps")
    return losses


__all__ = ["DreamPolicy", "DreamPolicyError", "POLICY_FILES", "POLICY_JSON", "POLICY_TENSORS", "attach_policy",
           "check_policy_tensors", "copy_policy_tensors", "load_policy", "read_policy", "rest_em_update", "save_policy", "write_policy_files"]
