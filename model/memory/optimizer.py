"""The chunked per-level update of the continuum memory (paper eq. 2, docs/design.md §1).

:class:`ChunkedOptimizer` holds one AdamW per memory level of a
:class:`~model.memory.cms.ContinuumMemory` and applies level l's summed gradient every
C(l) wake steps; its moments and mid-chunk gradients travel with the saved state.
"""

from __future__ import annotations

import torch
from torch import nn

from model.memory.cms import ContinuumMemory


class ChunkedOptimizer:
    """Per-level optimisers applied every C(l) steps on accumulated gradients (eq. 2).

    ``theta_{i+1} = theta_i - e_{i,l}`` where ``e_{i,l}`` is nonzero only when
    ``i = 0 (mod C(l))`` and is built from the gradients of the last C(l) steps: the
    gradients are summed (autograd accumulation) over the chunk, then one AdamW step
    with the level's learning rate is taken and the level's gradients are cleared.
    """

    def __init__(self, cms: ContinuumMemory, grad_clip: float | None = 1.0) -> None:
        self.cms = cms
        self.grad_clip = grad_clip
        self.optimizers = [
            torch.optim.AdamW(params, lr=lvl.lr, weight_decay=lvl.weight_decay, betas=(0.9, 0.999))
            for params, lvl in zip(cms.parameters_by_level(), cms.cfg.levels)
        ]

    def due(self, step: int) -> list[int]:
        """Levels whose chunk ends at wake step ``step`` (1-based)."""
        return [li for li, lvl in enumerate(self.cms.cfg.levels) if step % lvl.chunk_size == 0]

    def step(self) -> list[int]:
        """Call after each backward pass: count the step, update the levels that are due."""
        self.cms.step += 1
        updated = self.due(self.cms.step)
        for li in updated:
            for p in self.cms.level_parameters(li, self.cms.frozen_slots(li)):
                p.grad = None  # read-only experts: their gradients are dropped, never applied
            params = [p for p in self.cms.level_parameters(li, self.cms.writable_slots(li)) if p.grad is not None]
            if not params:
                continue
            if self.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
            self.optimizers[li].step()
            self.optimizers[li].zero_grad(set_to_none=True)
        return updated

    def drop_state(self, params: list[nn.Parameter]) -> None:
        """Forget optimiser state (moments, step) of the given parameters."""
        for opt in self.optimizers:
            for p in params:
                opt.state.pop(p, None)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Optimiser moments and pending (mid-chunk) gradients, keyed by parameter name."""
        out: dict[str, torch.Tensor] = {}
        for name, p in self.cms.named_memory_parameters():
            if p.grad is not None:
                out[f"grad/{name}"] = p.grad.detach().clone()
            for opt in self.optimizers:
                st = opt.state.get(p)
                if st:
                    for key, val in st.items():
                        out[f"opt/{key}/{name}"] = torch.as_tensor(val).detach().clone().reshape(-1) if key == "step" else val.detach().clone()
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`state_tensors` (the CMS parameters must already be loaded)."""
        params = dict(self.cms.named_memory_parameters())
        owner = {p: opt for opt in self.optimizers for g in opt.param_groups for p in g["params"]}
        for key, val in tensors.items():
            kind, rest = key.split("/", 1)
            if kind == "grad":
                params[rest].grad = val.to(params[rest].device, copy=True)
            else:
                stat, name = rest.split("/", 1)
                p = params[name]
                st = owner[p].state.setdefault(p, {})
                st[stat] = val.reshape(()).clone() if stat == "step" else val.to(p.device, copy=True)


__all__ = ["ChunkedOptimizer"]
