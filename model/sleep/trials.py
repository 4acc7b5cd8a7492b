"""Dreams tried in isolation (docs/design.md §3, step 3), k trials in one vectorised pass.

A trial gives one dream its own fresh LoRA adapter, fine-tunes that adapter on the
dream alone for a few steps (SFT on the whole dream text) and measures tau before
(base model) and after (with the adapter); reward = 1 if tau improved, else 0.

Trials are independent, so k of them share every forward and backward pass, through
the k stacked adapters of :mod:`model.sleep.trial_lora`:

* a training step is one (k, T) batch, row i = dream i, and the loss is the sum over
  trials of each trial's own mean token NLL, so adapter i's gradient is exactly its
  trial's gradient alone; AdamW is elementwise, so one AdamW over the stacked tensors
  is k independent optimisers (gradient clipping, if asked for, is per trial);
* the base is frozen, so the decoder layers below the first adapted layer compute the
  same thing for every trial and every step: that prefix runs once, without gradient,
  for the dreams (reused by all steps) and for the measure's questions (shared by all
  k adapters).

Adapter i starts as peft's default LoRA created right after ``torch.manual_seed(seeds[i])``
(:func:`model.sleep.trial_lora.attach_multi_lora`), so :func:`run_trial_peft` (peft,
one trial at a time) is the reference that :func:`run_trials` must match.

A measure is a callable ``measure(adapters)``: with ``None`` it measures the model as
it is and returns a (1,) tensor; with a (m,) long tensor of adapter indices it returns
(m,) values, value j taken with adapter ``adapters[j]``. Higher is better.
:class:`model.sleep.trial_lora.AnswerLoglik` is such a measure: mean log-likelihood per
token of gold answers.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from model.decoding.forward import Batch, prefix_hidden, suffix_logprobs
from model.memory.wake import sft_loss
from model.sleep.trial_lora import MultiLoRA, attach_multi_lora

Measure = Callable[[torch.Tensor | None], torch.Tensor]


# --- the dream batch and the trials ---


def dream_tokens(
    tokenizer: PreTrainedTokenizerBase, dream: str, max_length: int, prompt: str = ""
) -> tuple[list[int], int]:
    """(ids, n_prompt): prompt tokens, then the dream's tokens and EOS (all of which are trained on).

    An empty prompt becomes one start token (BOS, or EOS where there is no BOS).
    Raises ValueError if the sequence is longer than ``max_length``.
    """
    p = list(tokenizer(prompt, add_special_tokens=True)["input_ids"]) if prompt else []
    if not p:
        p = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id]
    c = list(tokenizer(dream, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
    if len(p) + len(c) > max_length:
        raise ValueError(f"dream has {len(c)} tokens (with EOS) after a {len(p)}-token prompt, more than max_length {max_length}")
    return p + c, len(p)


def dream_batch(examples: Sequence[tuple[list[int], int]], pad_id: int) -> Batch:
    """One example per row, right-padded: input_ids, position_ids (0..T-1), segment, completion_mask (R, T).

    Row i is example i (``segment`` i on its tokens, -1 on padding). Right padding keeps
    real tokens from seeing padding under the causal mask.
    """
    T = max(len(ids) for ids, _ in examples)
    R = len(examples)
    input_ids = torch.full((R, T), pad_id, dtype=torch.long)
    segment = torch.full((R, T), -1, dtype=torch.long)
    comp = torch.zeros((R, T), dtype=torch.bool)
    for i, (ids, n_prompt) in enumerate(examples):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        segment[i, : len(ids)] = i
        comp[i, n_prompt : len(ids)] = True
    return Batch(input_ids, torch.arange(T).expand(R, T).clone(), segment, comp, R)


def _select_rows(batch: Batch, rows: torch.Tensor) -> tuple[Batch, int]:
    """Rows ``rows`` of a :func:`dream_batch`, renumbered and cut to their longest row; returns T."""
    seg = batch.segment[rows]
    T = int((seg >= 0).sum(1).max())
    seg = torch.where(seg[:, :T] >= 0, torch.arange(len(rows), device=seg.device).view(-1, 1), -1)
    return Batch(batch.input_ids[rows, :T], batch.position_ids[rows, :T], seg, batch.completion_mask[rows, :T], len(rows)), T


@dataclass
class TrialLog:
    """Training record of one trial: SFT loss per step, and why it was rejected (None: not)."""

    losses: list[float] = field(default_factory=list)
    error: str | None = None


@dataclass
class TrialResult:
    """One dream tried in isolation. ``tau_after`` is None for a rejected trial."""

    index: int
    tau_before: float
    tau_after: float | None
    improved: bool
    reward: int  # 1 if tau_after > tau_before else 0
    final_loss: float  # SFT loss of the last step taken (before its update); nan if none
    error: str | None
    losses: list[float] = field(default_factory=list)
    weights: dict[str, torch.Tensor] | None = None  # the trained adapter, when asked for


@contextlib.contextmanager
def frozen_base(model: nn.Module) -> Iterator[None]:
    """Temporarily set ``requires_grad=False`` on every current parameter of ``model``."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def train_trials(
    lora: MultiLoRA,
    tokenizer: PreTrainedTokenizerBase,
    dreams: Sequence[str],
    *,
    steps: int,
    lr: float,
    max_length: int,
    prompt: str = "",
    weight_decay: float = 0.0,
    grad_clip: float | None = None,
) -> list[TrialLog]:
    """SFT adapter i on dream i, all k at once, for ``steps`` AdamW steps.

    Each step is one batch of the live trials' rows; loss = sum_i mean-NLL_i. A trial
    whose dream is too long, whose loss or gradient turns non-finite, is rejected: its
    error is set, it leaves the batch and its adapter keeps the values it had.
    """
    if len(dreams) != lora.k:
        raise ValueError(f"{len(dreams)} dreams for {lora.k} adapters")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    model, k = lora.model, lora.k
    logs = [TrialLog() for _ in range(k)]
    examples: list[tuple[list[int], int]] = []
    rows_of: dict[int, int] = {}
    for i, dream in enumerate(dreams):
        try:
            examples.append(dream_tokens(tokenizer, dream, max_length, prompt))
            rows_of[i] = len(examples) - 1
        except ValueError as exc:
            logs[i].error = f"rejected before training: {exc}"
    if not examples:
        return logs
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    full = dream_batch(examples, pad).to(model.device)
    start = lora.first_layer
    hidden = prefix_hidden(model, full.input_ids, full.position_ids, start)  # (n, T, d), reused every step
    params = lora.parameters()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    frozen: dict[int, list[torch.Tensor]] = {i: [p.detach()[i].clone() for p in params] for i in range(k) if logs[i].error}
    for step in range(1, steps + 1):
        live = [i for i in range(k) if logs[i].error is None]
        if not live:
            break
        rows = torch.tensor([rows_of[i] for i in live], device=full.input_ids.device)
        batch, T = _select_rows(full, rows)
        with lora.rows_use(torch.tensor(live)):
            logp, n = suffix_logprobs(model, hidden[rows, :T], batch, start)
        per_trial = -logp / n.clamp(min=1)  # (len(live),)
        finite = torch.isfinite(per_trial.detach())
        for i, v in zip(live, per_trial.detach().tolist()):
            logs[i].losses.append(v)
            if not math.isfinite(v):
                logs[i].error = f"non-finite SFT loss {v} at step {step}"
        if bool(finite.any()):
            torch.where(finite, per_trial, torch.zeros_like(per_trial)).sum().backward()
        keep = torch.zeros(k, dtype=torch.bool, device=params[0].device)
        keep[[i for i in live if logs[i].error is None]] = True
        sq = torch.zeros(k, device=params[0].device)
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.masked_fill_(~keep.view(-1, 1, 1), 0.0)
            sq += p.grad.detach().pow(2).flatten(1).sum(1)
        for i in live:
            if logs[i].error is None and not math.isfinite(float(sq[i])):
                logs[i].error = f"non-finite gradient at step {step}"
                keep[i] = False
                for p in params:
                    p.grad[i] = 0.0
        if grad_clip is not None:
            coef = torch.where(keep, (grad_clip / (sq.sqrt() + 1e-6)).clamp(max=1.0), torch.ones_like(sq))
            for p in params:
                p.grad.mul_(coef.view(-1, 1, 1))
        for i in live:
            if not keep[i]:
                frozen[i] = [p.detach()[i].clone() for p in params]
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for i, values in frozen.items():
                for p, v in zip(params, values):
                    p[i] = v
    return logs


def score_trials(lora: MultiLoRA, logs: Sequence[TrialLog], measure: Measure, tau_before: float) -> list[TrialResult]:
    """tau after for every trial that was not rejected (one batched call), and the rewards."""
    alive = [i for i, log in enumerate(logs) if log.error is None]
    taus = measure(torch.tensor(alive, dtype=torch.long)).tolist() if alive else []
    after = dict(zip(alive, taus))
    results = []
    for i, log in enumerate(logs):
        tau = after.get(i)
        improved = tau is not None and tau > tau_before
        final = log.losses[-1] if log.losses else float("nan")
        results.append(TrialResult(i, tau_before, tau, improved, int(improved), final, log.error, list(log.losses)))
    return results


@dataclass(frozen=True)
class TrialRecipe:
    """How every trial trains its adapter: ``steps`` AdamW steps at ``lr`` of a rank-``r`` LoRA (scale ``alpha``) on
    ``target_modules`` of ``layers`` (None: all), on the dream after ``prompt``, cut to ``max_length`` tokens."""

    steps: int
    lr: float
    r: int
    alpha: float
    target_modules: Sequence[str]
    layers: Sequence[int] | None
    max_length: int
    prompt: str = ""
    weight_decay: float = 0.0
    grad_clip: float | None = None


def run_trials(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    dreams: Sequence[str],
    measure: Measure,
    recipe: TrialRecipe,
    seeds: Sequence[int],
    keep_weights: bool = False,
) -> list[TrialResult]:
    """Try every dream in isolation, all in one batched pass; the model is left as it was.

    tau before is ``measure(None)`` on the base; tau after is ``measure(alive indices)``
    with the multi-LoRA attached. ``keep_weights`` copies each trained adapter into its result.
    """
    rc = recipe
    with frozen_base(model):
        tau_before = float(measure(None)[0])
        lora = attach_multi_lora(model, len(dreams), rc.r, rc.alpha, rc.target_modules, rc.layers, seeds)
        try:
            logs = train_trials(
                lora, tokenizer, dreams, steps=rc.steps, lr=rc.lr, max_length=rc.max_length,
                prompt=rc.prompt, weight_decay=rc.weight_decay, grad_clip=rc.grad_clip,
            )
            results = score_trials(lora, logs, measure, tau_before)
            if keep_weights:
                for res in results:
                    res.weights = lora.adapter_weights(res.index)
        finally:
            lora.detach()
    return results


def run_trial_peft(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    dream: str,
    measure: Measure,
    recipe: TrialRecipe,
    seed: int,
    index: int = 0,
    keep_weights: bool = False,
) -> TrialResult:
    """Reference: one trial with a peft LoRA (``get_peft_model`` under ``torch.manual_seed(seed)``).

    Same loss (full forward, :func:`model.memory.wake.sft_loss`), AdamW and rejection rules as
    :func:`run_trials`; the adapter is unloaded afterwards, leaving the model as it was.
    """
    from peft import LoraConfig, get_peft_model

    rc = recipe
    cfg = LoraConfig(
        r=rc.r,
        lora_alpha=rc.alpha,
        target_modules=list(rc.target_modules),
        layers_to_transform=None if rc.layers is None else list(rc.layers),
        lora_dropout=0.0,
        bias="none",
        init_lora_weights=True,
    )
    log = TrialLog()
    tau_after: float | None = None
    weights: dict[str, torch.Tensor] | None = None
    with frozen_base(model):
        tau_before = float(measure(None)[0])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            peft_model = get_peft_model(model, cfg)
        try:
            params = [p for p in peft_model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=rc.lr, weight_decay=rc.weight_decay)
            try:
                ids, n_prompt = dream_tokens(tokenizer, dream, rc.max_length, rc.prompt)
            except ValueError as exc:
                log.error = f"rejected before training: {exc}"
            else:
                pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
                batch = dream_batch([(ids, n_prompt)], pad)
                for step in range(1, rc.steps + 1):
                    loss = sft_loss(model, batch)
                    log.losses.append(float(loss.item()))
                    if not math.isfinite(log.losses[-1]):
                        log.error = f"non-finite SFT loss {log.losses[-1]} at step {step}"
                        break
                    loss.backward()
                    norm = torch.sqrt(sum(p.grad.detach().pow(2).sum() for p in params))
                    if not math.isfinite(float(norm)):
                        log.error = f"non-finite gradient at step {step}"
                        break
                    if rc.grad_clip is not None:
                        torch.nn.utils.clip_grad_norm_(params, rc.grad_clip)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
            if log.error is None:
                tau_after = float(measure(None)[0])
            if keep_weights:
                weights = {
                    f"{name}.{part}": getattr(mod, part)["default"].weight.detach().clone()
                    for name, mod in model.named_modules()
                    if hasattr(mod, "lora_A") and "default" in mod.lora_A
                    for part in ("lora_A", "lora_B")
                }
        finally:
            peft_model.unload()
    improved = tau_after is not None and tau_after > tau_before
    final = log.losses[-1] if log.losses else float("nan")
    return TrialResult(index, tau_before, tau_after, improved, int(improved), final, log.error, log.losses, weights)


__all__ = [
    "Measure",
    "TrialLog",
    "TrialRecipe",
    "TrialResult",
    "dream_batch",
    "dream_tokens",
    "frozen_base",
    "run_trial_peft",
    "run_trials",
    "score_trials",
    "train_trials",
]
