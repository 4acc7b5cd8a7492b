"""A decoder forward pass in pieces, for sharing work between passes, and its input.

:class:`Batch` is what every training and scoring pass reads: examples packed into rows
(built by :func:`model.memory.wake.encode`). Consolidation (teacher and student) and isolated
trials (k adapters) run the same frozen layers below their first trainable layer many
times on the same input. These helpers run that prefix once (no gradient) and the rest
per pass, and apply the LM head only at the positions that predict a completion token.
The decoder's pieces (embedding, layers, final norm, mask, rotary) come from
:func:`model.decoding.architecture.decoder_of` (Llama, Qwen2, Qwen3).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from model.decoding.architecture import decoder_of


@dataclass
class Batch:
    """Examples packed into rows: several prompt+completion sequences share a row.

    input_ids, position_ids, segment, completion_mask: (R, T). ``position_ids`` restart
    at 0 for every example, which makes the attention block-diagonal (each example
    sees only itself, exactly as if it were alone); ``segment`` is the example index
    of each token (-1 for padding); ``completion_mask`` marks completion tokens.
    Packing instead of padding every example to the longest one keeps the GEMMs busy
    with real tokens (CLINC queries vary from 3 to 30 tokens).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    segment: torch.Tensor
    completion_mask: torch.Tensor
    n_examples: int

    @property
    def n_tokens(self) -> int:
        return int((self.segment >= 0).sum())

    def to(self, device: torch.device | str) -> "Batch":
        """The same batch on ``device`` (itself when it is already there)."""
        if self.input_ids.device == torch.device(device):
            return self
        return Batch(self.input_ids.to(device), self.position_ids.to(device), self.segment.to(device),
                     self.completion_mask.to(device), self.n_examples)


def trunk_signature(model: PreTrainedModel, start: int) -> tuple:
    """What a cache of the layers below ``start`` was computed by: the model, and the embedding's and those layers'
    tensors (storage, dtype, in-place version). Trained in place, cast to another dtype (a tensor swapped into a
    parameter's ``.data``), or wrapped by an adapter, the signature changes."""
    arch = decoder_of(model)
    return (id(model), tuple((name, id(p), p.data_ptr(), p.dtype, p._version)
                             for m in (arch.embed, *arch.layers[:start]) for name, p in m.named_parameters()))


class TrunkCache:
    """The hidden states below decoder layer ``start`` of scoring passes, by their tokens, positions and mask.

    Nothing below the first CMS layer ever learns, so passes that score the same inputs in several states
    of the memory (the dream stage's promotion check before and after its training) need those layers
    once: :meth:`hidden` computes a pass's trunk the first time and returns it after. The cache empties
    itself when the layers below ``start`` are not the same modules with the same parameter versions as
    when it was filled (trained in place, or wrapped by an adapter); forward hooks that change their
    output (the dream policy, which is off whenever the model answers) must be in the same state in every
    pass that shares it.
    """

    def __init__(self, start: int) -> None:
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self.start = start
        self.hits = self.misses = 0
        self._store: dict[bytes, torch.Tensor] = {}
        self._signature: tuple | None = None

    def hidden(self, model: PreTrainedModel, input_ids: torch.Tensor, position_ids: torch.Tensor,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states (R, T, d) after layers [0, start) for ``input_ids`` (R, T) at ``position_ids``, with
        the 4D boolean ``mask`` (None: causal), computed once per distinct input while the trunk is unchanged."""
        signature = trunk_signature(model, self.start)
        if signature != self._signature:
            self._store.clear()
            self._signature = signature
        digest = hashlib.sha256()
        for t in (input_ids, position_ids, *(() if mask is None else (mask,))):
            digest.update(str(tuple(t.shape)).encode())
            digest.update(t.detach().cpu().contiguous().numpy().tobytes())
        key = digest.digest()
        h = self._store.get(key)
        if h is None:
            self.misses += 1
            arch = decoder_of(model)
            with torch.no_grad():
                h = arch.embed(input_ids)
                if self.start > 0:
                    h = arch.run_layers(h, position_ids, 0, self.start, mask=mask)
            self._store[key] = h
        else:
            self.hits += 1
        return h


def mask_and_rope(
    model: PreTrainedModel, h: torch.Tensor, position_ids: torch.Tensor
) -> tuple[torch.Tensor | None, tuple[torch.Tensor, torch.Tensor]]:
    """The causal (block-diagonal when packed) mask and the rotary (cos, sin) for h (R, T, d)."""
    return decoder_of(model).mask_and_rope(h, position_ids)


@torch.no_grad()
def prefix_hidden(model: PreTrainedModel, input_ids: torch.Tensor, position_ids: torch.Tensor, start: int) -> torch.Tensor:
    """Hidden states (R, T, d) after decoder layers [0, start), without gradient."""
    dec = decoder_of(model)
    device = dec.embed.weight.device
    input_ids, position_ids = input_ids.to(device), position_ids.to(device)
    h = dec.embed(input_ids)
    if start > 0:
        h = dec.run_layers(h, position_ids, 0, start)
    return h


def suffix_hidden(model: PreTrainedModel, hidden: torch.Tensor, position_ids: torch.Tensor, start: int) -> torch.Tensor:
    """Layers [start, L) and the final norm on ``hidden`` (R, T, d) -> (R, T, d)."""
    dec = decoder_of(model)
    return dec.norm(dec.run_layers(hidden, position_ids, start))


def completion_logits(model: PreTrainedModel, hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Logits (M, V) at the M positions whose next token is a completion token (head on those only)."""
    predict = batch.completion_mask[:, 1:]
    return model.get_output_embeddings()(hidden[:, :-1][predict]).float()


def logprobs_by_example(logits: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of completion-token log-probabilities per example (N,) and token counts (N,)."""
    predict = batch.completion_mask[:, 1:]
    token_lp = -F.cross_entropy(logits, batch.input_ids[:, 1:][predict], reduction="none")  # (M,)
    example = batch.segment[:, 1:][predict]  # (M,)
    logp = torch.zeros(batch.n_examples, dtype=token_lp.dtype, device=token_lp.device).index_add(0, example, token_lp)
    n = torch.zeros(batch.n_examples, dtype=torch.long, device=example.device).index_add(0, example, torch.ones_like(example))
    return logp, n


def suffix_logprobs(
    model: PreTrainedModel, hidden: torch.Tensor, batch: Batch, start: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """From the prefix ``hidden`` (R, T, d): per-example completion log-probabilities (N,) and counts (N,)."""
    batch = batch.to(hidden.device)
    return logprobs_by_example(completion_logits(model, suffix_hidden(model, hidden, batch.position_ids, start), batch), batch)
