"""Sampling continuations from the model in whatever CMS view is active (teacher/student/dream).

A thin, seeded wrapper over Hugging Face ``generate`` with left padding and a KV
cache, batched over many prompts. It returns the new text only, cut at EOS.
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
) -> list[Sample]:
    """Sample ``n_per_prompt`` continuations of every prompt; temperature 0 means greedy.

    Returns prompt-major order: all samples of prompt 0, then prompt 1, ...
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
    out: list[Sample] = []
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            for start in range(0, len(expanded), batch_size):
                chunk = expanded[start : start + batch_size]
                enc = tokenizer(chunk, return_tensors="pt", padding=True)
                kwargs = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0} if temperature > 0 else {"do_sample": False}
                gen = model.generate(
                    **enc, max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos, **kwargs
                )
                new = gen[:, enc["input_ids"].shape[1] :]
                for prompt, row in zip(chunk, new.tolist()):
                    finished = eos in row
                    ids = row[: row.index(eos)] if finished else row
                    out.append(Sample(prompt, tokenizer.decode(ids, skip_special_tokens=True), finished))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return out
