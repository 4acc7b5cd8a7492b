"""Sampling continuations from the model in whatever CMS view is active (teacher/student/dream).

Seeded, batched decoding with a KV cache over left-padded prompts. It returns the new
text only, cut at EOS.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class Sample:
    prompt: str
    text: str
    finished: bool  # ended with EOS (False: cut at max_new_tokens)


def pick_tokens(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """Next tokens (B,) from logits (B, V): greedy at temperature 0, else nucleus sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        outside = sorted_p.cumsum(dim=-1) - sorted_p >= top_p  # tokens after the nucleus is full
        sorted_p = sorted_p.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def sample_continuations(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    n_per_prompt: int = 1,
    max_new_tokens: int = 16,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 32,
    min_new_tokens: int = 0,
) -> list[Sample]:
    """Sample ``n_per_prompt`` continuations of every prompt; temperature 0 means greedy.

    EOS cannot be drawn before ``min_new_tokens`` tokens (a model that learned to answer
    with one short label and stop can still be made to write more).

    A plain KV-cache decoding loop over left-padded batches (no ``generate``: its
    per-step machinery costs more than the model itself at this size). Finished rows
    keep feeding padding until the whole batch is done. Seeded by its own generator,
    so the caller's random state is untouched. Returns prompt-major order.
    """
    if not prompts:
        raise ValueError("no prompts to sample from")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    expanded = [p for p in prompts for _ in range(n_per_prompt)]
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = model.device
    gen = torch.Generator(device=device).manual_seed(seed)
    out: list[Sample] = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(expanded), batch_size):
            chunk = expanded[start : start + batch_size]
            enc = tokenizer(chunk, return_tensors="pt", padding=True).to(device)
            mask = enc["attention_mask"]
            pos = (mask.cumsum(dim=1) - 1).clamp(min=0)
            step = model(input_ids=enc["input_ids"], attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
            last = pos[:, -1:]
            done = torch.zeros(len(chunk), dtype=torch.bool, device=device)
            new: list[torch.Tensor] = []
            for t in range(max_new_tokens):
                logits = step.logits[:, -1]
                if t < min_new_tokens:
                    logits = logits.index_fill(-1, torch.tensor([eos], device=device), float("-inf"))
                nxt = pick_tokens(logits, temperature, top_p, gen).masked_fill(done, pad)
                new.append(nxt)
                done |= nxt == eos
                if bool(done.all()) or t == max_new_tokens - 1:
                    break
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                last = last + 1
                step = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=last, cache=step.cache, use_cache=True)
            rows = torch.stack(new, dim=1).tolist()
            for prompt, row in zip(chunk, rows):
                finished = eos in row
                ids = row[: row.index(eos)] if finished else row
                out.append(Sample(prompt, tokenizer.decode(ids, skip_special_tokens=True), finished))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return out
