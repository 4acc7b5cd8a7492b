"""Wake: online learning of the memory levels on a stream of labelled text.

An example is written with a template such as ``"{text} -> {label}"``; the part
before ``{label}`` is the prompt and the label (plus EOS) is the completion. Wake
trains on the completion tokens only, one batch per step, and lets the
:class:`~model.cms.ChunkedOptimizer` update each level every C(l) steps (eq. 2).
Accuracy is measured by label log-likelihood: the predicted label is the candidate
whose completion has the highest total log-probability.

The LM head (49k x 576 for SmolLM2) is applied only at the positions that predict a
completion token, so the loss and the scores do not pay for full-vocabulary logits
at every prompt position.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from model.cms import ChunkedOptimizer


def label_text(label: str) -> str:
    """How a label is written for the model: ``pin_change`` -> ``pin change``."""
    return label.replace("_", " ")


def split_template(template: str, text: str, label: str) -> tuple[str, str]:
    """Fill ``template`` and split it into (prompt, completion) at ``{label}``."""
    head = template[: template.rindex("{label}")]
    return head.format(text=text), label_text(label)


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


def encode(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], completions: Sequence[str], max_length: int
) -> Batch:
    """Tokenise prompt and completion separately (the boundary is exact) and pack into rows.

    The completion gets an EOS token. Over-long prompts are cut from the left so the
    completion is always kept whole; a completion of ``max_length`` tokens or more is
    an error. Rows are ``max_length`` long (first-fit, longest examples first).
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    if not prompts:
        raise ValueError("nothing to encode: no examples")
    p_ids = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    c_ids = tokenizer(list(completions), add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    examples: list[tuple[list[int], int]] = []
    for p, c, prompt, comp in zip(p_ids, c_ids, prompts, completions):
        if not p:
            raise ValueError(f"prompt {prompt!r} encodes to no tokens")
        c = list(c) + [eos]
        if len(c) >= max_length:
            raise ValueError(f"completion {comp!r} has {len(c)} tokens, more than max_length-1 ({max_length - 1})")
        p = list(p)[-(max_length - len(c)) :]
        examples.append((p + c, len(p)))
    rows: list[list[int]] = []  # example indices per row
    free: list[int] = []
    for k in sorted(range(len(examples)), key=lambda k: -len(examples[k][0])):
        n = len(examples[k][0])
        r = next((r for r, f in enumerate(free) if f >= n), None)
        if r is None:
            rows.append([])
            free.append(max_length)
            r = len(rows) - 1
        rows[r].append(k)
        free[r] -= n
    T = max(max_length - f for f in free)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    input_ids = torch.full((len(rows), T), pad, dtype=torch.long)
    position_ids = torch.zeros((len(rows), T), dtype=torch.long)
    segment = torch.full((len(rows), T), -1, dtype=torch.long)
    comp_mask = torch.zeros((len(rows), T), dtype=torch.bool)
    for r, members in enumerate(rows):
        at = 0
        for k in members:
            ids, n_prompt = examples[k]
            n = len(ids)
            input_ids[r, at : at + n] = torch.tensor(ids)
            position_ids[r, at : at + n] = torch.arange(n)
            segment[r, at : at + n] = k
            comp_mask[r, at + n_prompt : at + n] = True
            at += n
        position_ids[r, at:] = torch.arange(T - at)  # padding forms its own segment
    return Batch(input_ids, position_ids, segment, comp_mask, len(examples))


def completion_logprobs(model: PreTrainedModel, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log p(completion token | prefix) per example, and the token counts.

    Returns (logp: (N,), n: (N,)) in the order the examples were given. The output
    head runs on the M completion positions only: hidden (R, T, d) -> (M, d) -> logits (M, V).
    """
    # No KV cache: with one, transformers would not derive the block-diagonal (packed) mask.
    hidden = model.get_decoder()(
        input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False
    ).last_hidden_state
    predict = batch.completion_mask[:, 1:]  # position t predicts token t+1 (same segment)
    h = hidden[:, :-1][predict]  # (M, d)
    targets = batch.input_ids[:, 1:][predict]  # (M,)
    logits = model.get_output_embeddings()(h).float()  # (M, V)
    token_lp = -F.cross_entropy(logits, targets, reduction="none")  # (M,)
    example = batch.segment[:, 1:][predict]  # (M,)
    logp = torch.zeros(batch.n_examples, dtype=token_lp.dtype).index_add(0, example, token_lp)
    n = torch.zeros(batch.n_examples, dtype=torch.long).index_add(0, example, torch.ones_like(example))
    return logp, n


def sft_loss(model: PreTrainedModel, batch: Batch) -> torch.Tensor:
    """Mean negative log-likelihood per completion token (scalar)."""
    logp, n = completion_logprobs(model, batch)
    return -logp.sum() / n.sum().clamp(min=1)


@dataclass
class StepLog:
    step: int
    loss: float
    tokens: int
    updated_levels: list[int]


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/inf loss; the state must not be saved."""


def train_period(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    optimizer: ChunkedOptimizer,
    prompts: Sequence[str],
    completions: Sequence[str],
    batch_size: int,
    max_length: int,
    epochs: int = 1,
    on_step: Callable[[StepLog], None] | None = None,
) -> list[StepLog]:
    """One wake period: read the examples in order, one optimiser step call per batch.

    Each level is updated only when its chunk ends (eq. 2); every other step just
    accumulates its gradients. Raises NonFiniteLossError on a NaN/inf loss.
    """
    model.train()
    logs: list[StepLog] = []
    n = len(prompts)
    try:
        for _ in range(epochs):
            for start in range(0, n, batch_size):
                batch = encode(tokenizer, prompts[start : start + batch_size], completions[start : start + batch_size], max_length)
                loss = sft_loss(model, batch)
                if not math.isfinite(loss.item()):
                    raise NonFiniteLossError(f"non-finite wake loss {loss.item()} at step {optimizer.cms.step + 1}")
                loss.backward()
                updated = optimizer.step()
                log = StepLog(optimizer.cms.step, float(loss.item()), batch.n_tokens, updated)
                logs.append(log)
                if on_step is not None:
                    on_step(log)
    finally:
        model.eval()
    return logs


@torch.inference_mode()
def score_candidates(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    candidates: Sequence[str],
    batch_size: int,
    max_length: int,
) -> torch.Tensor:
    """Log-likelihood of every candidate completion after every prompt: (P, C).

    The P*C pairs are sorted by length before batching so little compute goes to padding.
    """
    pairs = [(i, j) for i in range(len(prompts)) for j in range(len(candidates))]
    p_len = [len(x) for x in tokenizer(list(prompts))["input_ids"]]
    c_len = [len(x) for x in tokenizer(list(candidates), add_special_tokens=False)["input_ids"]]
    pairs.sort(key=lambda ij: p_len[ij[0]] + c_len[ij[1]])
    scores = torch.empty(len(prompts), len(candidates))
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        batch = encode(tokenizer, [prompts[i] for i, _ in chunk], [candidates[j] for _, j in chunk], max_length)
        logp, _ = completion_logprobs(model, batch)
        for (i, j), v in zip(chunk, logp.tolist()):
            scores[i, j] = v
    return scores


def classify(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    template: str,
    texts: Sequence[str],
    labels: Sequence[str],
    batch_size: int,
    max_length: int,
) -> list[str]:
    """Predict one of ``labels`` for each text by label log-likelihood."""
    prompts = [split_template(template, t, labels[0])[0] for t in texts]
    comps = [label_text(lab) for lab in labels]
    scores = score_candidates(model, tokenizer, prompts, comps, batch_size, max_length)
    return [labels[j] for j in scores.argmax(dim=1).tolist()]


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]
