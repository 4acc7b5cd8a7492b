"""An lm-sleep model for Hugging Face ``transformers``: a Llama causal LM with memory levels after its MLPs.

This file is copied into every directory ``lm-sleep export`` writes, and loaded from there with
``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)``; it imports only torch and
transformers. (In lm-sleep itself the same computation is model/memory/cms.py and model/memory/prototypes.py.)

In each layer of ``config.lm_sleep["layers"]`` the MLP output ``h`` goes through the memory levels,
fastest first (fp32)::

    h <- h + MoE_l(h),   MoE_l(h) = sum_{e in topk_l} sigmoid(r_e . h) * B_e act(A_e h)

A level keeps only its active experts, concatenated: ``A`` (d, E * d_low), ``B`` (E * d_low, d),
``router`` (E, d). The experts are gated and routed (nonlinear in h), so they cannot be merged
into the base weights.

Prototype routing (when the state had prototypes, ``config.lm_sleep["prototype_layer"]`` set): each
sequence's mean residual stream entering decoder layer ``prototype_layer`` (over the tokens its
attention mask marks) is standardised and matched to the nearest prototype (by cosine, or, with
``prototype_metric`` "mahalanobis", by distance after the ``whiten`` matrix), which names a period p; only experts of periods <= p fire for that sequence. The routing is decided at the first
forward pass of a sequence (an empty cache: the prompt) and kept for the tokens generated after it.
Set ``lm_sleep_routing="all"`` (e.g. as a ``from_pretrained`` keyword) to let every expert fire.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

_ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}


class LMSleepConfig(LlamaConfig):
    """A Llama config plus ``lm_sleep``: layers, activation, levels (top_k, d_low, expert periods), routing."""

    model_type = "lm_sleep"


class RoutingState:
    """What the current sequences were routed to: a period per row (B,), or None (every expert fires)."""

    def __init__(self) -> None:
        self.periods: torch.Tensor | None = None
        self.route_now = True  # the next pass starts sequences (empty cache): route them
        self.mask: torch.Tensor | None = None  # (B, T) attention mask of that pass


class MemoryLevel(nn.Module):
    """One level's active experts at one layer. ``periods[e]``: the period expert e learned (-1: always on)."""

    def __init__(self, d: int, d_low: int, top_k: int, periods: list[int], activation: str) -> None:
        super().__init__()
        n = len(periods)
        self.d_low, self.top_k, self.periods, self.act = d_low, top_k, list(periods), _ACTIVATIONS[activation]
        self.A = nn.Parameter(torch.zeros(d, n * d_low))
        self.B = nn.Parameter(torch.zeros(n * d_low, d))
        self.router = nn.Parameter(torch.zeros(n, d))

    def forward(self, x: torch.Tensor, row_periods: torch.Tensor | None, tokens_per_row: int) -> torch.Tensor:
        """MoE_l(x) for x (N, d) = (B * T, d) in fp32; ``row_periods`` (B,) hides later periods' experts."""
        n, r = len(self.periods), self.d_low
        logits = x @ self.router.float().T  # (N, E)
        gates = torch.sigmoid(logits)
        visible = None
        if row_periods is not None:
            own = torch.tensor(self.periods, device=x.device)
            visible = (own[None, :] <= row_periods[:, None]).repeat_interleave(tokens_per_row, dim=0)  # (N, E)
        if self.top_k < n:  # the top-k among the visible experts
            ranked = logits if visible is None else logits.masked_fill(~visible, float("-inf"))
            keep = torch.zeros_like(gates, dtype=torch.bool).scatter_(1, ranked.topk(self.top_k, dim=1).indices, True)
            gates = gates * (keep if visible is None else keep & visible)
        elif visible is not None:
            gates = gates * visible
        hidden = self.act(x @ self.A.float()).view(-1, n, r) * gates.unsqueeze(-1)  # (N, E, r)
        return hidden.view(-1, n * r) @ self.B.float()


class MemoryBlock(nn.Module):
    """A decoder layer's MLP followed by its memory levels (levels with no active expert are skipped)."""

    def __init__(self, mlp: nn.Module, d: int, levels: list[dict], activation: str, routing: RoutingState) -> None:
        super().__init__()
        self.mlp = mlp
        self.levels = nn.ModuleList([MemoryLevel(d, lv["d_low"], lv["top_k"], lv["periods"], activation) for lv in levels])
        self.routing = routing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mlp(x)
        shape, out_dtype = h.shape, h.dtype
        h = h.float().reshape(-1, shape[-1])  # memory levels compute in fp32
        periods = self.routing.periods
        if periods is not None and periods.shape[0] != shape[0]:
            periods = None  # not the routed batch (a caller's own pass): every expert fires
        for level in self.levels:
            if level.periods:
                h = h + level(h, periods, shape[1])
        return h.view(shape).to(out_dtype)


class PrototypeRouter(nn.Module):
    """Prototypes of every period's inputs: mean, scale (d,); centroids (P, d); periods (P,); for the
    mahalanobis metric, whiten (d, d) (the shared covariance's inverse Cholesky factor)."""

    def __init__(self, d: int, n_prototypes: int, mahalanobis: bool = False) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(d))
        self.register_buffer("scale", torch.ones(d))
        self.register_buffer("centroids", torch.zeros(n_prototypes, d))
        self.register_buffer("periods", torch.zeros(n_prototypes, dtype=torch.long))
        self.register_buffer("whiten", torch.zeros(d, d) if mahalanobis else None)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The period of each sequence's nearest prototype: hidden (B, T, d), mask (B, T) -> (B,)."""
        h = hidden.float()
        real = torch.ones(h.shape[:2], device=h.device) if mask is None else mask.to(h.device, torch.float32)
        features = (h * real[..., None]).sum(1) / real.sum(1, keepdim=True).clamp(min=1.0)  # (B, d)
        z = F.normalize((features - self.mean.float()) / self.scale.float(), dim=1)
        if self.whiten is None:  # cosine: the most similar unit centroid
            return self.periods[(z @ self.centroids.float().T).argmax(dim=1)]
        w = self.whiten.float()  # mahalanobis: the nearest centroid after whitening, argmax 2 y.c - |c|^2
        y, c = z @ w.T, self.centroids.float() @ w.T
        return self.periods[(2.0 * y @ c.T - (c * c).sum(dim=1)).argmax(dim=1)]


class LMSleepForCausalLM(LlamaForCausalLM):
    """LlamaForCausalLM with lm-sleep's memory levels (and prototype routing) in its selected layers."""

    config_class = LMSleepConfig

    def __init__(self, config: LMSleepConfig) -> None:
        super().__init__(config)
        spec = config.lm_sleep
        self.lm_sleep_state = RoutingState()
        layers = self.model.layers
        for i in spec["layers"]:
            layers[i].mlp = MemoryBlock(layers[i].mlp, config.hidden_size, spec["levels"], spec["activation"],
                                        self.lm_sleep_state)
        self.lm_sleep_router = None
        if spec.get("prototype_layer") is not None:
            self.lm_sleep_router = PrototypeRouter(config.hidden_size, spec["n_prototypes"],
                                                   spec.get("prototype_metric") == "mahalanobis")
            self.model.register_forward_pre_hook(self._start_pass, with_kwargs=True)
            layers[spec["prototype_layer"]].register_forward_pre_hook(self._route, with_kwargs=True)

    def _start_pass(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Before the decoder: a pass with an empty cache starts new sequences, which are routed afresh."""
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        state = self.lm_sleep_state
        state.route_now = cache is None or cache.get_seq_length() == 0
        mask = kwargs.get("attention_mask")
        state.mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        if state.route_now:
            state.periods = None

    def _route(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        """At the routing layer's input: each new sequence's period (or every expert, lm_sleep_routing='all')."""
        state = self.lm_sleep_state
        if not state.route_now or getattr(self.config, "lm_sleep_routing", "prototype") == "all":
            return
        hidden = args[0] if args else kwargs["hidden_states"]
        mask = state.mask if state.mask is not None and state.mask.shape == hidden.shape[:2] else None
        state.periods = self.lm_sleep_router(hidden, mask)
