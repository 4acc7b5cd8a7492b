"""Routing that separates inputs: routers trained so that an expert fires on its own period's inputs.

Every expert's gate is ``sigmoid(r_e . h)`` over the hidden state ``h`` that reaches its
level (model/memory/cms.py). Without a signal that tells inputs apart, the fast level fires on
every input, and after a wake it answers old tasks with the new task's labels; the paper's
Figure 8 has "a router selects and updates a small set of experts, leaving others
inactive ... limiting interference". Here the routers of the experts that are learning
(the fast level's in wake, the new slow expert's in consolidation) get a routing loss:

    L_route = mean_{h in current inputs} BCE(r_e . h, 1) + mean_{h in other inputs} BCE(r_e . h, 0)

over every token of every CMS layer. The *other* inputs are the model's own dreams about
earlier tasks (model/sleep/rehearsal.py), never stored examples: sleep t dreams inputs of tasks
0..t from their label names, keeps them in the state it writes, and wake t+1 uses them as
the negatives of its fast level; consolidation uses the dreams of the same sleep.
The hidden states at the CMS layers come from a deep layer of a causal LM, so they carry
the input's context: "decide from the whole input".
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from model.memory.cms import ContinuumMemory


@contextlib.contextmanager
def captured_inputs(cms: ContinuumMemory, level: int) -> Iterator[list[list[torch.Tensor]]]:
    """Record the hidden states (..., d) that reach ``level`` in every CMS layer, per forward pass.

    Yields one list per CMS layer; each forward pass through the level appends its input
    (with its autograd graph, so a loss on it trains the routers).
    """
    banks = cms.banks(level)
    seen: list[list[torch.Tensor]] = [[] for _ in banks]

    def hook(k: int):
        def grab(_module, args):
            seen[k].append(args[0])
        return grab

    handles = [b.register_forward_pre_hook(hook(k)) for k, b in enumerate(banks)]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def router_logits(cms: ContinuumMemory, level: int, slots: Sequence[int], inputs: Sequence[torch.Tensor],
                  mask: torch.Tensor) -> torch.Tensor:
    """Router logits r_e . h of ``slots`` at the real tokens of one captured pass, all layers: (L * M, E).

    inputs: one (R, T, d) tensor per CMS layer; mask: (R, T) bool, the real (non-padding) tokens.
    """
    out = []
    for bank, h in zip(cms.banks(level), inputs):
        R = torch.stack([bank.router[s] for s in slots], dim=1)  # (d, E)
        out.append(h.detach()[mask.to(h.device)].float() @ R)  # (M, E); only the routers learn from it
    return torch.cat(out)


def routing_loss(positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """L_route: BCE of the router logits, 1 on the current period's tokens and 0 on the others' (scalar)."""
    pos = F.binary_cross_entropy_with_logits(positive, torch.ones_like(positive))
    neg = F.binary_cross_entropy_with_logits(negative, torch.zeros_like(negative))
    return pos + neg


@torch.no_grad()
def gate_means(cms: ContinuumMemory, level: int, slots: Sequence[int], inputs: Sequence[torch.Tensor],
               mask: torch.Tensor) -> float:
    """Mean sigmoid gate of ``slots`` over the real tokens of one captured pass (a diagnostic)."""
    return float(torch.sigmoid(router_logits(cms, level, slots, inputs, mask)).mean())


__all__ = ["captured_inputs", "gate_means", "router_logits", "routing_loss"]
