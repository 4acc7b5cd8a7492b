"""k LoRA adapters on one model, one chosen per batch row (docs/design.md §3, step 3).

The machinery behind :mod:`model.sleep.trials`: trials are independent, so k of them
share every forward and backward pass.

* every targeted ``nn.Linear`` is wrapped by a :class:`MultiLoRALinear` that holds k
  stacked adapters (``A``: (k, r, in), ``B``: (k, out, r), peft's ``lora_A.weight`` /
  ``lora_B.weight`` layouts stacked) and routes each batch row to one of them
  (:func:`rows_use`);
* the base is frozen, so the decoder layers below the first adapted layer
  (:func:`first_multi_lora_layer`) compute the same thing for every adapter: that
  prefix runs once, without gradient, and only the suffix runs per adapter.

Adapter i is initialised exactly as peft's default LoRA (``init_lora_weights=True``)
created right after ``torch.manual_seed(seeds[i])``: peft builds ``lora_A`` and
``lora_B`` as ``nn.Linear`` (each draws a kaiming-uniform init from the global RNG),
then re-draws ``lora_A`` with ``kaiming_uniform_(a=sqrt(5))`` and zeroes ``lora_B``,
module by module in ``named_modules`` order. :func:`attach_multi_lora` replays those
draws, so :func:`model.sleep.trials.run_trial_peft` (peft, one trial at a time) is the
reference that :func:`model.sleep.trials.run_trials` must match.

:class:`AnswerLoglik` is a trial measure (see :mod:`model.sleep.trials`): mean
log-likelihood per token of gold answers, for the base model or for m adapters at once.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from model.decoding.forward import Batch, prefix_hidden, suffix_logprobs
from model.memory.cms import decoder_layers
from model.memory.wake import encode


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
    def per_example(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Without adapters: each pair's summed answer log-likelihood (N,) and its answer tokens (N,), so that
        tau over any subset of the pairs is sum(logp[idx]) / sum(n[idx])."""
        b = self.batch
        with rows_use(self.model, None):
            return suffix_logprobs(self.model, prefix_hidden(self.model, b.input_ids, b.position_ids, 0), b, 0)

    @torch.no_grad()
    def __call__(self, adapters: torch.Tensor | None) -> torch.Tensor:
        b = self.batch
        if adapters is None:
            logp, n = self.per_example()
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


__all__ = [
    "AnswerLoglik",
    "MultiLoRA",
    "MultiLoRALinear",
    "attach_multi_lora",
    "first_multi_lora_layer",
    "rows_use",
]
