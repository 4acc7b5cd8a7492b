"""Continuum memory system (CMS): levels of low-rank experts after the MLP (paper eq. 1).

For each selected decoder layer the MLP is wrapped by a :class:`CMSBlock`; after the
MLP's output ``h`` a chain of memory levels l = 1..k (fastest first) is applied::

    h <- h + MoE_l(h)                                             (eq. 1)
    MoE_l(h) = sum_{e in topk(router_l(h), active)} g_e * B_e(act(A_e h))

Every level holds ``E_max`` pre-allocated experts (A: d x d_low, B: d_low x d) and an
*active mask*; a masked expert is not part of the forward pass, so it gets no gradient
(its ``.grad`` stays ``None``). Unlocking an expert ("parameter expansion", paper 3.2)
gives it ``B = 0``, so the function does not change (up to float rounding in the fused
GEMM); no tensor ever changes shape.

Gates are ``sigmoid`` of the router logits and are not renormalised over the selected
experts: a freshly unlocked expert (``B = 0``) adds exactly zero and leaves the other
experts' gates alone. (With a softmax over the top-k, unlocking would rescale every
other expert.) When a level has more active experts than ``top_k``, a new expert can
still enter the top-k for a token and push a weaker one out; the output is exactly
unchanged only while ``n_active <= top_k``.

A level spans all selected layers: slot ``s`` of level ``l`` is one expert made of the
slot-``s`` weights of every layer, and is unlocked, reset and saved as one unit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from model.config import CMSConfig, LevelConfig
from model.decoding.architecture import decoder_of
from model.errors import UserError

_ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}
#: How the origin of an expert that a sleep's dream stage unlocked begins (``dream@period-N``).
DREAM_ORIGIN = "dream@"


class CMSError(UserError, ValueError):
    """An invalid operation on the memory levels (bad level index, no free slot, ...)."""


class NoFreeSlotError(CMSError):
    """A level has no free expert slot left to unlock.

    Policy: this is an error, never a silent overwrite. Free capacity by resetting a
    faster level (consolidation does this) or raise ``n_experts`` in params.yaml.
    """


@dataclass
class ExpertInfo:
    """Provenance of one expert slot of a level."""

    slot: int
    active: bool = False
    unlocked_at_step: int | None = None
    origin: str | None = None  # e.g. "init", "consolidation:fast->slow@step-40"
    history: list[str] = field(default_factory=list)
    frozen: bool = False  # read-only in wake (a consolidated expert, cms.freeze_consolidated)
    period: int | None = None  # the wake period whose data it learned last (prototype routing, model/memory/prototypes.py)


class ExpertBank(nn.Module):
    """One memory level at one layer: ``E_max`` low-rank experts and their router rows.

    Shapes: ``A[e]`` (d, d_low), ``B[e]`` (d_low, d), ``router[e]`` (d,).
    """

    def __init__(self, d: int, cfg: LevelConfig, activation: str) -> None:
        super().__init__()
        self.d, self.d_low, self.top_k = d, cfg.d_low, cfg.top_k
        self.act = _ACTIVATIONS[activation]
        n = cfg.n_experts
        self.A = nn.ParameterList([nn.Parameter(torch.zeros(d, cfg.d_low)) for _ in range(n)])
        self.B = nn.ParameterList([nn.Parameter(torch.zeros(cfg.d_low, d)) for _ in range(n)])
        self.router = nn.ParameterList([nn.Parameter(torch.zeros(d)) for _ in range(n)])
        self.slots: list[int] = []  # active slots, kept in sync by ContinuumMemory
        self.random_generator: torch.Generator | None = None  # set in dream mode

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """MoE_l(h) over the active experts. h: (..., d) -> (..., d)."""
        shape = h.shape
        x = h.reshape(-1, self.d)  # (N, d)
        n_act, r = len(self.slots), self.d_low
        A = torch.cat([self.A[s] for s in self.slots], dim=1)  # (d, Ea*r)
        B = torch.cat([self.B[s] for s in self.slots], dim=0)  # (Ea*r, d)
        R = torch.stack([self.router[s] for s in self.slots], dim=0)  # (Ea, d)
        logits = x @ R.T  # (N, Ea)
        gates = torch.sigmoid(logits)
        k = min(self.top_k, n_act)
        if k < n_act:  # otherwise every active expert is selected anyway
            keep = torch.zeros_like(gates, dtype=torch.bool)
            keep.scatter_(1, logits.topk(k, dim=1).indices, True)
            if self.random_generator is not None:
                # Dream mode (paper 3.4): each router also activates one random expert that its top-k left
                # off (uniform over the unselected ones: random keys, selected ones pushed to -inf).
                keys = torch.rand(x.shape[0], n_act, generator=self.random_generator).to(x.device)
                keep.scatter_(1, keys.masked_fill(keep, -1.0).argmax(dim=1, keepdim=True), True)
            gates = gates * keep
        elif self.random_generator is not None and n_act > 0:
            # Every active expert is already on (n_active <= top_k): none is off, so dream mode drives a
            # random one at full gate instead of its router's sigmoid.
            rnd = torch.randint(n_act, (x.shape[0], 1), generator=self.random_generator).to(x.device)
            gates = gates.scatter(1, rnd, 1.0)
        hidden = self.act(x @ A).view(-1, n_act, r) * gates.unsqueeze(-1)  # (N, Ea, r)
        return (hidden.view(-1, n_act * r) @ B).view(shape)


class CMSBlock(nn.Module):
    """A decoder layer's MLP followed by the chain of memory levels (eq. 1)."""

    def __init__(self, mlp: nn.Module, d: int, cfg: CMSConfig) -> None:
        super().__init__()
        self.mlp = mlp
        self.levels = nn.ModuleList([ExpertBank(d, lvl, cfg.activation) for lvl in cfg.levels])
        self.enabled = [True] * len(cfg.levels)  # per-level mask (teacher/student views)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mlp(x)
        out_dtype = h.dtype
        h = h.float()  # memory levels compute in fp32 even over a bf16 base
        for bank, on in zip(self.levels, self.enabled):
            if on and bank.slots:
                h = h + bank(h)
        return h.to(out_dtype)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a Hugging Face causal LM (Llama, Qwen2, Qwen3: :func:`model.decoding.architecture.decoder_of`).

    Raises :class:`~model.decoding.architecture.UnsupportedArchitectureError` naming any other architecture.
    """
    return decoder_of(model).layers


@torch.no_grad()
def copy_bank_expert(bank_s: ExpertBank, s: int, bank_d: ExpertBank, d: int) -> None:
    """Set expert ``d`` of ``bank_d`` to expert ``s`` of ``bank_s`` in one layer: A, B and router; with a larger
    destination rank the extra dimensions are zero (adding nothing), with a smaller one the leading ones are kept."""
    r = min(bank_s.A[s].shape[1], bank_d.A[d].shape[1])
    bank_d.A[d].zero_()
    bank_d.B[d].zero_()
    bank_d.A[d][:, :r].copy_(bank_s.A[s][:, :r])
    bank_d.B[d][:r].copy_(bank_s.B[s][:r])
    bank_d.router[d].copy_(bank_s.router[s])


class ContinuumMemory(nn.Module):
    """All memory levels of a model, plus the operations on them (docs/design.md §1).

    The base model's own weights are the slowest memory and stay frozen. Create it
    with :func:`attach_cms`; it keeps a reference to the model it was attached to.
    """

    def __init__(self, model: nn.Module, cfg: CMSConfig, seed: int = 0) -> None:
        super().__init__()
        layers = decoder_layers(model)
        n_layers = len(layers)
        idx = cfg.layers if cfg.layers is not None else list(range(max(0, n_layers - cfg.top_layers), n_layers))
        bad = [i for i in idx if i >= n_layers]
        if bad:
            raise CMSError(f"cms.layers: {bad} out of range, the model has {n_layers} decoder layers")
        self.cfg = cfg
        self.layer_ids = sorted(idx)
        self.d = model.config.hidden_size
        self.blocks = nn.ModuleDict()
        for i in self.layer_ids:
            block = layers[i].mlp if isinstance(layers[i].mlp, CMSBlock) else None
            if block is not None:
                raise CMSError(f"layer {i} already carries a CMS; attach once per model")
            self.blocks[str(i)] = CMSBlock(layers[i].mlp, self.d, cfg)
        for i in self.layer_ids:
            layers[i].mlp = self.blocks[str(i)]
        self.experts: list[list[ExpertInfo]] = [
            [ExpertInfo(slot=s) for s in range(lvl.n_experts)] for lvl in cfg.levels
        ]
        self.step = 0  # wake steps taken so far (drives eq. 2 and the sleep schedule)
        self.period = 0  # the wake period being learned (or slept on): the period new experts belong to
        self.prototypes = None  # model.memory.prototypes.Prototypes: where each period's inputs lie (None: no routing)
        self.dream_policy = None  # model.sleep.dream_policy.DreamPolicy: the dream generator's adapter, kept with the state
        self._gen = torch.Generator().manual_seed(seed)
        self.base_model = [model]  # a list, so the base is not registered as a submodule
        for li, lvl in enumerate(cfg.levels):
            for _ in range(lvl.initial_experts):
                self.unlock(li, origin="init")

    # ------------------------------------------------------------------ views
    @property
    def n_levels(self) -> int:
        return len(self.cfg.levels)

    def banks(self, level: int) -> list[ExpertBank]:
        """The level's expert bank in every CMS layer."""
        self._check_level(level)
        return [blk.levels[level] for blk in self.blocks.values()]

    def active_slots(self, level: int) -> list[int]:
        self._check_level(level)
        return [e.slot for e in self.experts[level] if e.active]

    def writable_slots(self, level: int) -> list[int]:
        """Active slots that wake's eq.-2 step may move (not frozen by a sleep)."""
        self._check_level(level)
        return [e.slot for e in self.experts[level] if e.active and not e.frozen]

    def frozen_slots(self, level: int) -> list[int]:
        self._check_level(level)
        return [e.slot for e in self.experts[level] if e.active and e.frozen]

    def freeze(self, level: int, slot: int, reason: str) -> None:
        """Make an active expert read-only in wake (its weights change only in a later sleep's merge)."""
        info = self.experts[level][slot]
        if not info.active:
            raise CMSError(f"level {level} slot {slot} is not active; only an active expert can be frozen")
        info.frozen = True
        info.history.append(f"frozen@{self.step}:{reason}")

    def kept_dream_slots(self, level: int) -> list[int]:
        """Read-only experts that hold a sleep's kept dream training (``dream.keep_dreams``): they stay when the
        level is consolidated."""
        self._check_level(level)
        return [e.slot for e in self.experts[level]
                if e.active and e.frozen and (e.origin or "").startswith(DREAM_ORIGIN)]

    def since_sleep_masked(self, levels: list[int], hidden: dict[int, list[int]] | None = None):
        """:meth:`levels_masked` without what ``levels`` learned since their last consolidation: each level whole,
        or, when it keeps kept-dream experts, every other expert of it. ``hidden`` as in :meth:`levels_masked`."""
        hidden = dict(hidden or {})
        whole = []
        for level in levels:
            if keep := self.kept_dream_slots(level):
                hidden[level] = [s for s in self.active_slots(level) if s not in keep]
            else:
                whole.append(level)
        return self.levels_masked(whole, hidden=hidden)

    def free_since_sleep(self, level: int, reason: str) -> list[nn.Parameter]:
        """Free what ``level`` learned since its last consolidation (:meth:`reset_level`, kept-dream experts
        spared). Returns the freed parameters."""
        keep = self.kept_dream_slots(level)
        if not keep:
            return self.reset_level(level, reason)
        return [p for s in range(self.cfg.levels[level].n_experts) if s not in keep
                for p in self.reset_slot(level, s, reason)]

    def free_slots(self, level: int) -> list[int]:
        self._check_level(level)
        return [e.slot for e in self.experts[level] if not e.active]

    def level_parameters(self, level: int, slots: list[int] | None = None) -> list[nn.Parameter]:
        """Parameters of a level (all slots, or the given ones), across layers."""
        slots = list(range(self.cfg.levels[level].n_experts)) if slots is None else slots
        return [p for bank in self.banks(level) for s in slots for p in (bank.A[s], bank.B[s], bank.router[s])]

    def _check_level(self, level: int) -> None:
        if not 0 <= level < len(self.cfg.levels):
            raise CMSError(f"level index {level} out of range: this CMS has levels 0..{len(self.cfg.levels) - 1}")

    def refresh_routing(self, level: int) -> None:
        """Push the level's active slots to its banks (after any change to the active mask)."""
        slots = self.active_slots(level)
        for bank in self.banks(level):
            bank.slots = slots

    # ------------------------------------------------------------- operations
    def reseed(self, seed: int) -> None:
        """Restart the generator that new experts' A and router are drawn from, so that a unit of work (a passage)
        draws the same experts whether its run went on or resumed from a saved state."""
        self._gen.manual_seed(seed)

    def unlock(self, level: int, origin: str) -> int:
        """Parameter expansion: activate a free slot with B = 0 (output unchanged). Returns the slot."""
        free = self.free_slots(level)
        if not free:
            raise NoFreeSlotError(
                f"level {level} ('{self.cfg.levels[level].name}') has no free expert slot "
                f"(n_experts={self.cfg.levels[level].n_experts}); reset a level or raise n_experts"
            )
        slot = free[0]
        std = self.cfg.init_std
        with torch.no_grad():
            for bank in self.banks(level):
                # Drawn on the CPU (the generator lives there), so every device gets the same values.
                bank.A[slot].copy_(torch.empty(bank.A[slot].shape).normal_(0.0, std, generator=self._gen))
                bank.B[slot].zero_()
                bank.router[slot].copy_(torch.empty(bank.router[slot].shape).normal_(0.0, std, generator=self._gen))
        info = self.experts[level][slot]
        info.active, info.unlocked_at_step, info.origin, info.frozen = True, self.step, origin, False
        info.period = self.period
        info.history.append(f"unlocked@{self.step}:{origin}")
        self.refresh_routing(level)
        return slot

    def copy_expert(self, src: tuple[int, int], dst: tuple[int, int]) -> bool:
        """Set expert ``dst`` = (level, slot) to expert ``src``'s weights and router, in every CMS layer.

        Exact when the destination's rank is at least the source's: the extra rank dimensions
        get A = 0 and B = 0, and the activation maps 0 to 0, so they add nothing. With a smaller
        rank the leading dimensions are kept (an approximation). Returns whether the copy is exact.
        Both experts must be active; the destination's record is left as it is (its origin).
        """
        for level, slot in (src, dst):
            self._check_level(level)
            if slot not in self.active_slots(level):
                raise CMSError(f"cannot copy: level {level} slot {slot} is not active")
        r_src, r_dst = self.cfg.levels[src[0]].d_low, self.cfg.levels[dst[0]].d_low
        for bank_s, bank_d in zip(self.banks(src[0]), self.banks(dst[0])):
            copy_bank_expert(bank_s, src[1], bank_d, dst[1])
        self.experts[dst[0]][dst[1]].history.append(f"copied@{self.step}:level-{src[0]}/slot-{src[1]}")
        return r_dst >= r_src

    def reset_level(self, level: int, reason: str = "reset") -> list[nn.Parameter]:
        """Synaptic pruning: zero and mask every expert of a level. Returns the freed parameters
        (so a caller can drop their optimiser state)."""
        self._check_level(level)
        return [p for slot in range(self.cfg.levels[level].n_experts) for p in self.reset_slot(level, slot, reason)]

    def reset_slot(self, level: int, slot: int, reason: str) -> list[nn.Parameter]:
        """Zero and mask one expert of a level (its slot becomes free). Returns its parameters."""
        params = self.level_parameters(level, [slot])
        with torch.no_grad():
            for p in params:
                p.zero_()
                p.grad = None
        info = self.experts[level][slot]
        if info.active:
            info.history.append(f"reset@{self.step}:{reason}")
        info.active, info.unlocked_at_step, info.origin, info.frozen, info.period = False, None, None, False, None
        self.refresh_routing(level)
        return params

    def begin_period(self, period: int) -> None:
        """A wake period starts: experts unlocked from now on, and every writable expert (it learns this
        period's data now), belong to ``period``; frozen experts keep the period they were filled in."""
        if period < 0:
            raise CMSError(f"period {period}: periods are numbered from 0")
        self.period = period
        for level in self.experts:
            for info in level:
                if info.active and not info.frozen and info.period != period:
                    info.period = period
                    info.history.append(f"period@{self.step}:{period}")

    def set_level_enabled(self, level: int, enabled: bool) -> None:
        """Mask (False) or unmask (True) a whole level in the forward pass."""
        self._check_level(level)
        for blk in self.blocks.values():
            blk.enabled[level] = enabled

    @contextlib.contextmanager
    def levels_masked(self, levels: list[int], hidden: dict[int, list[int]] | None = None) -> Iterator[None]:
        """Temporarily mask whole levels and hide some experts of other levels, on top of what an enclosing context
        hides already (its hidden experts stay hidden inside and after this one).

        This is how one module serves as both teacher and student in consolidation:
        the teacher hides the newly unlocked expert, the student masks the fast level.
        """
        before_enabled = [list(blk.enabled) for blk in self.blocks.values()]
        outer = {lv: set(self.active_slots(lv)) - set(self.banks(lv)[0].slots) for lv in hidden or {}}
        try:
            for lv in levels:
                self.set_level_enabled(lv, False)
            for lv, slots in (hidden or {}).items():
                visible = [s for s in self.active_slots(lv) if s not in slots and s not in outer[lv]]
                for bank in self.banks(lv):
                    bank.slots = visible
            yield
        finally:
            for blk, en in zip(self.blocks.values(), before_enabled):
                blk.enabled = en
            for lv, still_hidden in outer.items():  # the active experts now (a slot may have changed inside)
                visible = [s for s in self.active_slots(lv) if s not in still_hidden]
                for bank in self.banks(lv):
                    bank.slots = visible

    @contextlib.contextmanager
    def trainable_only(self, params: list[nn.Parameter]) -> Iterator[None]:
        """Temporarily let only ``params`` receive gradients (other levels keep their .grad)."""
        keep = {id(p) for p in params}
        saved = [(p, p.requires_grad) for _, p in self.named_memory_parameters()]
        try:
            for p, _ in saved:
                p.requires_grad_(id(p) in keep)
            yield
        finally:
            for p, flag in saved:
                p.requires_grad_(flag)

    @contextlib.contextmanager
    def random_expert_routing(self, seed: int) -> Iterator[None]:
        """Dream mode: every router also activates one random active expert per token."""
        gen = torch.Generator().manual_seed(seed)
        banks = [b for blk in self.blocks.values() for b in blk.levels]
        try:
            for b in banks:
                b.random_generator = gen
            yield
        finally:
            for b in banks:
                b.random_generator = None

    def named_memory_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The memory levels' own parameters (not the wrapped base MLPs), by stable name."""
        for name, p in self.named_parameters():
            if ".mlp." not in name:
                yield name, p

    def parameters_by_level(self) -> list[list[nn.Parameter]]:
        return [self.level_parameters(level) for level in range(self.n_levels)]

    def manifest(self) -> dict:
        """JSON-ready description of every level and expert (without checksums)."""
        return {
            "layers": self.layer_ids,
            "d": self.d,
            "step": self.step,
            "period": self.period,
            "levels": [
                {**lvl.model_dump(), "experts": [asdict(e) for e in self.experts[li]]}
                for li, lvl in enumerate(self.cfg.levels)
            ],
        }


def attach_cms(model: nn.Module, cfg: CMSConfig, seed: int = 0) -> ContinuumMemory:
    """Wrap the MLPs of the selected decoder layers with memory levels; freeze the base.

    Returns the :class:`ContinuumMemory`; only its parameters require gradients.
    """
    model.requires_grad_(False)
    cms = ContinuumMemory(model, cfg, seed=seed)
    cms.requires_grad_(True)
    for blk in cms.blocks.values():
        blk.mlp.requires_grad_(False)
    return cms


__all__ = [
    "CMSBlock",
    "CMSError",
    "ContinuumMemory",
    "ExpertBank",
    "ExpertInfo",
    "NoFreeSlotError",
    "attach_cms",
    "copy_bank_expert",
    "decoder_layers",
]
