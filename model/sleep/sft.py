"""Supervised fine-tuning of chosen parameters on (prompt, completion) pairs: what dreaming trains promoted
dreams with, ReST-EM trains the dream generator with, and knowledge incorporation trains passages with
(docs/design.md §3)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from model.memory.wake import NonFiniteLossError, encode, sft_loss


def train_on_pairs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    params: Sequence[nn.Parameter],
    prompts: Sequence[str],
    completions: Sequence[str],
    steps: int,
    lr: float,
    max_length: int,
    batch_size: int | None = None,
) -> list[float]:
    """SFT of ``params`` on the pairs; returns the losses.

    ``batch_size=None``: all pairs in one packed batch every step. Otherwise step k trains on the k-th
    minibatch of ``batch_size`` pairs, cycling through them in order (the memory of one step stays that of
    ``batch_size`` pairs however many there are).
    """
    if not prompts or steps == 0:
        return []
    params = list(params)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    size = len(prompts) if batch_size is None else batch_size
    batches = [encode(tokenizer, prompts[i : i + size], completions[i : i + size], max_length)
               for i in range(0, len(prompts), size)]
    keep = {id(p) for p in params}
    saved = [(p, p.requires_grad) for p in model.parameters()]
    losses = []
    model.train()
    try:
        for p, _ in saved:
            p.requires_grad_(id(p) in keep)
        for step in range(steps):
            loss = sft_loss(model, batches[step % len(batches)])
            if not math.isfinite(loss.item()):
                raise NonFiniteLossError(f"non-finite dream SFT loss {loss.item()}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses.append(float(loss.item()))
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
            p.grad = None
        model.eval()
    return losses


__all__ = ["train_on_pairs"]
