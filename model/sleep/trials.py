"""Dreams tried in isolation (docs/design.md §3, step 3), k trials in one vectorised pass.

A trial gives one dream its own fresh LoRA adapter, fine-tunes that adapter on the
dream alone for a few steps (SFT on the whole dream text) and measures tau before
(base model) and after (with the adapter); reward = 1 if tau improved, else 0.

Trials are independent, so k of them share every forward and backward pass:

* every targeted ``nn.Linear`` is wrapped by a :class:`MultiLoRALinear` that holds k
  stacked adapters (``A``: (k, r, in), ``B``: (k, out, r), peft's ``lora_A.weight`` /
  ``lora_B.weight`` layouts stacked) and routes each batch row to one of them;
* a training step is one (k, T) batch, row i = dream i, and the loss is the sum over
  trials of each trial's own mean token NLL, so adapter i's gradient is exactly its
  trial's gradient alone; AdamW is elementwise, so one AdamW over the stacked tensors
  is k independent optimisers (gradient clipping, if asked for, is per trial);
* the base is frozen, so the decoder layers below the first adapted layer compute the
  same thing for every trial and every step: that prefix runs once, without gradient,
  for the dreams (reused by all steps) and for the measure's questions (shared by all
  k adapters).

Adapter i is initialised exactly as peft's default LoRA (``init_lora_weights=True``)
created right after ``torch.manual_seed(seeds[i])``: peft builds ``lora_A`` and
``lora_B`` as ``nn.Linear`` (each draws a kaiming-uniform init from the global RNG),
then re-draws ``lora_A`` with ``kaiming_uniform_(a=sqrt(5))`` and zeroes ``lora_B``,
module by module in ``named_modules`` order. :func:`attach_multi_lora` replays those
draws, so :func:`run_trial_peft` (peft, one trial at a time) is the reference that
:func:`run_trials` must match.

A measure is a callable ``measure(adapters)``: with ``None`` it measures the model as
it is and returns a (1,) tensor; with a (m,) long tensor of adapter indices it returns
(m,) values, value j taken with adapter ``adapters[j]``. Higher is better.
:class:`AnswerLoglik` is such a measure: mean log-likelihood per token of gold answers.
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
from model.memory.cms import decoder_layers
from model.memory.wake import encode, sft_loss

Measure = Callable[[torch.Tensor | None], torch.Tensor]


class MultiLoRALinear(nn.Module):
    """A frozen ``nn.Linear`` (in -> out) plus k LoRA adapters, one chosen per batch row.

    ``A``: (k, r, in), ``B``: (k, out, r), fp32, scaling ``alpha / r``, no dropout.
    ``row_adapter`` ((R,) long or None) is set by :func:`rows_use`; None means base only.
    """

    def __init__(self, base: nn.Linear, k: int, r: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        w = base.weight
        self.k, self.r, self.scaling = k, r, alpha / r
        self.A = nn.Parameter(torch.zeros(k, r, base.in_features, device=w.device))
        self.B = nn.Parameter(torch.zeros(k, base.out_features, r, device=w.device))
        self.row_adapter: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (R, ..., in) -> (R, ..., out); row j adds ``scale * B[a_j] A[a_j] x_j``."""
        y = self.base(x)
        idx = self.row_adapter
        if idx is None:
            return y
        if idx.shape[0] != x.shape[0]:
            raise ValueError(f"row_adapter routes {idx.shape[0]} rows but the input has {x.shape[0]}")
        xs = x.reshape(x.shape[0], -1, x.shape[-1]).to(self.A.dtype)  # (R, N, in)
        low = torch.bmm(xs, self.A[idx].transpose(1, 2))  # (R, N, r)
        delta = torch.bmm(low, self.B[idx].transpose(1, 2))  # (R, N, out)
        return (y + delta.view(y.shape) * self.scaling).to(y.dtype)


def _multi_lora_modules(model: nn.Module) -> list[MultiLoRALinear]:
    return [m for m in model.modules() if isinstance(m, MultiLoRALinear)]


@contextlib.contextmanager
def rows_use(model: nn.Module, adapter_index: torch.Tensor | None) -> Iterator[None]:
    """Route batch row j through adapter ``adapter_index[j]`` ((R,) long) in every wrapped layer.

    ``None`` runs the base model. The previous routing is restored on exit.
    """
    mods = _multi_lora_modules(model)
    if adapter_index is not None:
        if not mods:
            raise ValueError("rows_use: the model has no multi-LoRA layers (attach_multi_lora first)")
        if adapter_index.dim() != 1 or adapter_index.dtype != torch.long:
            raise ValueError(f"adapter_index must be a 1-D long tensor, got {tuple(adapter_index.shape)} {adapter_index.dtype}")
        k = mods[0].k
        if adapter_index.numel() and (int(adapter_index.min()) < 0 or int(adapter_index.max()) >= k):
            raise ValueError(f"adapter indices must lie in [0, {k}), got {adapter_index.tolist()}")
        adapter_index = adapter_index.to(mods[0].A.device)
    before = [m.row_adapter for m in mods]
    try:
        for m in mods:
            m.row_adapter = adapter_index
        yield
    finally:
        for m, b in zip(mods, before):
            m.row_adapter = b


def _peft_draws(A: torch.Tensor, out_features: int) -> None:
    """Fill A (r, in) with the draws peft's default LoRA init makes for one module."""
    r, in_features = A.shape
    a = torch.empty(r, in_features)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # nn.Linear(in, r) construction
    nn.init.kaiming_uniform_(torch.empty(out_features, r), a=math.sqrt(5))  # nn.Linear(r, out) construction
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # reset_lora_parameters: the A that is kept
    A.copy_(a)


class MultiLoRA:
    """k stacked LoRA adapters attached to a model (made by :func:`attach_multi_lora`)."""

    def __init__(
        self,
        model: nn.Module,
        modules: dict[str, MultiLoRALinear],
        layers: list[int],
        k: int,
        r: int,
        alpha: float,
        seeds: list[int],
    ) -> None:
        self.model, self.modules, self.layers = model, modules, layers
        self.k, self.r, self.alpha, self.seeds = k, r, alpha, seeds
        self.first_layer = min(layers)
        self.attached = True

    def parameters(self) -> list[nn.Parameter]:
        """A and B of every wrapped layer, in ``named_modules`` order."""
        return [p for m in self.modules.values() for p in (m.A, m.B)]

    def rows_use(self, adapter_index: torch.Tensor | None) -> contextlib.AbstractContextManager[None]:
        """See :func:`rows_use`."""
        return rows_use(self.model, adapter_index)

    def adapter_weights(self, i: int) -> dict[str, torch.Tensor]:
        """Adapter i as ``{"<module>.lora_A": (r, in), "<module>.lora_B": (out, r)}`` (copies)."""
        out: dict[str, torch.Tensor] = {}
        for name, m in self.modules.items():
            out[f"{name}.lora_A"] = m.A[i].detach().clone()
            out[f"{name}.lora_B"] = m.B[i].detach().clone()
        return out

    def detach(self) -> None:
        """Put the original ``nn.Linear`` modules back (idempotent)."""
        if not self.attached:
            return
        for name, m in self.modules.items():
            parent_name, _, child = name.rpartition(".")
            setattr(self.model.get_submodule(parent_name), child, m.base)
            m.row_adapter = None
        self.attached = False


def _matches(name: str, targets: Sequence[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def attach_multi_lora(
    model: PreTrainedModel,
    k: int,
    r: int,
    alpha: float,
    target_modules: Sequence[str],
    layers: Sequence[int] | None,
    seeds: Sequence[int],
) -> MultiLoRA:
    """Wrap the ``target_modules`` Linears of decoder layers ``layers`` (None = all) with k adapters.

    Adapter i gets peft's default init under ``torch.manual_seed(seeds[i])`` (the global
    RNG state is left as it was). Raises ValueError on bad arguments or no match.
    """
    if k < 1 or r < 1:
        raise ValueError(f"k and r must be >= 1, got k={k}, r={r}")
    if len(seeds) != k:
        raise ValueError(f"{len(seeds)} seeds for {k} adapters")
    if not target_modules:
        raise ValueError("target_modules is empty")
    dec_layers = decoder_layers(model)
    chosen = list(range(len(dec_layers))) if layers is None else sorted(set(layers))
    if not chosen or any(i < 0 or i >= len(dec_layers) for i in chosen):
        raise ValueError(f"layers must be distinct indices in [0, {len(dec_layers)}), got {layers}")
    if _multi_lora_modules(model):
        raise ValueError("the model already carries multi-LoRA layers; detach them first")
    in_layer = {id(m): i for i, layer in enumerate(dec_layers) for m in layer.modules()}
    targets: list[tuple[str, nn.Linear]] = []
    for name, mod in model.named_modules():
        if in_layer.get(id(mod)) in chosen and _matches(name, target_modules):
            if type(mod) is not nn.Linear:
                raise ValueError(f"{name} is a {type(mod).__name__}, not an nn.Linear")
            targets.append((name, mod))
    if not targets:
        raise ValueError(f"no module named {list(target_modules)} in decoder layers {chosen}")
    wrapped = {name: MultiLoRALinear(lin, k, r, alpha) for name, lin in targets}
    with torch.no_grad():
        for i, seed in enumerate(seeds):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                for m in wrapped.values():
                    _peft_draws(m.A[i], m.base.out_features)
    for name, m in wrapped.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, m)
    used = sorted({in_layer[id(m.base)] for m in wrapped.values()})
    return MultiLoRA(model, wrapped, used, k, r, alpha, list(seeds))


# --- split forward: a frozen prefix shared by all adapters, then the adapted suffix ---


def first_multi_lora_layer(model: PreTrainedModel) -> int:
    """Index of the lowest decoder layer holding a multi-LoRA layer (0 if none)."""
    for i, layer in enumerate(decoder_layers(model)):
        if any(isinstance(m, MultiLoRALinear) for m in layer.modules()):
            return i
    return 0


def _replicate(batch: Batch, m: int) -> Batch:
    """The batch's rows m times over (replica-major); replica j's examples are j*N .. j*N+N-1."""
    N = batch.n_examples
    offset = (torch.arange(m, device=batch.segment.device) * N).repeat_interleave(batch.segment.shape[0]).view(-1, 1)  # (m*R, 1)
    seg = batch.segment.repeat(m, 1)
    seg = torch.where(seg >= 0, seg + offset, seg)
    return Batch(batch.input_ids.repeat(m, 1), batch.position_ids.repeat(m, 1), seg, batch.completion_mask.repeat(m, 1), m * N)


class AnswerLoglik:
    """tau = mean log-likelihood per token of gold answers given their prompts (higher is better).

    The (prompt, answer) pairs are packed once with :func:`model.memory.wake.encode` into R rows.
    Called with (m,) adapter indices it replicates the rows m times, routes replica j
    to adapter j and returns (m,) values; the layers below the first adapted layer run
    once for all replicas. At most ``rows_per_pass`` rows go through the suffix at once.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        prompts: Sequence[str],
        answers: Sequence[str],
        max_length: int,
        rows_per_pass: int = 64,
    ) -> None:
        self.model = model
        self.batch = encode(tokenizer, prompts, answers, max_length).to(model.device)
        self.rows_per_pass = rows_per_pass

    @torch.no_grad()
    def __call__(self, adapters: torch.Tensor | None) -> torch.Tensor:
        b = self.batch
        if adapters is None:
            with rows_use(self.model, None):
                logp, n = suffix_logprobs(self.model, prefix_hidden(self.model, b.input_ids, b.position_ids, 0), b, 0)
            return (logp.sum() / n.sum()).view(1)
        start = first_multi_lora_layer(self.model)
        hidden = prefix_hidden(self.model, b.input_ids, b.position_ids, start)  # (R, T, d)
        R, N = b.input_ids.shape[0], b.n_examples
        per_pass = max(1, self.rows_per_pass // R)
        out = []
        for at in range(0, len(adapters), per_pass):
            chunk = adapters[at : at + per_pass]
            m = len(chunk)
            with rows_use(self.model, chunk.repeat_interleave(R)):
                logp, n = suffix_logprobs(self.model, hidden.repeat(m, 1, 1), _replicate(b, m), start)
            out.append(logp.view(m, N).sum(1) / n.view(m, N).sum(1))
        return torch.cat(out)


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


def run_trials(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    dreams: Sequence[str],
    measure: Measure,
    *,
    steps: int,
    lr: float,
    r: int,
    alpha: float,
    target_modules: Sequence[str],
    layers: Sequence[int] | None,
    seeds: Sequence[int],
    max_length: int,
    prompt: str = "",
    weight_decay: float = 0.0,
    grad_clip: float | None = None,
    keep_weights: bool = False,
) -> list[TrialResult]:
    """Try every dream in isolation, all in one batched pass; the model is left as it was.

    tau before is ``measure(None)`` on the base; tau after is ``measure(alive indices)``
    with the multi-LoRA attached. ``keep_weights`` copies each trained adapter into its result.
    """
    with frozen_base(model):
        tau_before = float(measure(None)[0])
        lora = attach_multi_lora(model, len(dreams), r, alpha, target_modules, layers, seeds)
        try:
            logs = train_trials(
                lora, tokenizer, dreams, steps=steps, lr=lr, max_length=max_length,
                prompt=prompt, weight_decay=weight_decay, grad_clip=grad_clip,
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
    *,
    steps: int,
    lr: float,
    r: int,
    alpha: float,
    target_modules: Sequence[str],
    layers: Sequence[int] | None,
    seed: int,
    max_length: int,
    prompt: str = "",
    weight_decay: float = 0.0,
    grad_clip: float | None = None,
    index: int = 0,
    keep_weights: bool = False,
) -> TrialResult:
    """Reference: one trial with a peft LoRA (``get_peft_model`` under ``torch.manual_seed(seed)``).

    Same loss (full forward, :func:`model.memory.wake.sft_loss`), AdamW and rejection rules as
    :func:`run_trials`; the adapter is unloaded afterwards, leaving the model as it was.
    """
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=list(target_modules),
        layers_to_transform=None if layers is None else list(layers),
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
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
            try:
                ids, n_prompt = dream_tokens(tokenizer, dream, max_length, prompt)
            except ValueError as exc:
                log.error = f"rejected before training: {exc}"
            else:
                pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
                batch = dream_batch([(ids, n_prompt)], pad)
                for step in range(1, steps + 1):
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
                    if grad_clip is not None:
                        torch.nn.utils.clip_grad_norm_(params, grad_clip)
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
    "AnswerLoglik",
    "Measure",
    "MultiLoRA",
    "MultiLoRALinear",
    "TrialLog",
    "TrialResult",
    "attach_multi_lora",
    "dream_batch",
    "dream_tokens",
    "first_multi_lora_layer",
    "frozen_base",
    "rows_use",
    "run_trial_peft",
    "run_trials",
    "score_trials",
    "train_trials",
]
