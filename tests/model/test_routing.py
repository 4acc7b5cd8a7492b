"""Routing that separates inputs: L_route on the learning experts' routers (model/memory/routing.py)."""

from __future__ import annotations

import torch

from model.memory.optimizer import ChunkedOptimizer
from model.memory.routing import captured_inputs, gate_means, routing_loss
from model.memory.wake import encode, train_period
from tests.model.helpers import tiny_cms_config, tiny_with_cms

CURRENT = ["please set an alarm now ->", "wake me up at seven ->", "alarm for six please ->"] * 4
LABELS = ["alarm"] * len(CURRENT)
OTHERS = ["what is the weather like", "play a song for me", "how much money do I have", "book a table"]


def _gates(lm, cms, texts):
    batch = encode(lm.tokenizer, texts, [""] * len(texts), 32)
    with torch.no_grad(), captured_inputs(cms, 0) as seen:
        lm.model.get_decoder()(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False)
    return gate_means(cms, 0, cms.writable_slots(0), [x[0] for x in seen], batch.segment >= 0)


def test_routing_loss_is_zero_only_when_routers_separate():
    confident = routing_loss(torch.full((5, 1), 20.0), torch.full((4, 1), -20.0))
    wrong = routing_loss(torch.full((5, 1), -20.0), torch.full((4, 1), 20.0))
    assert float(confident) < 1e-6 and float(wrong) > 30


def test_wake_with_negatives_teaches_the_fast_router_to_fire_on_this_period_only():
    gaps = {}
    for weight in (0.0, 1.0):
        lm, cms = tiny_with_cms(cfg=tiny_cms_config(lr=3e-2))
        opt = ChunkedOptimizer(cms)
        before = {n: p.detach().clone() for n, p in lm.model.named_parameters() if ".levels." not in n}
        train_period(lm.model, lm.tokenizer, opt, CURRENT, LABELS, 4, 32, epochs=4,
                     negatives=OTHERS, route_weight=weight, negatives_per_step=4, seed=0)
        assert all(torch.equal(p, before[n]) for n, p in lm.model.named_parameters() if n in before)  # base frozen
        gaps[weight] = _gates(lm, cms, [c.rstrip(" ->") for c in CURRENT[:3]]) - _gates(lm, cms, OTHERS)
    assert gaps[1.0] > 0.3 and gaps[1.0] > gaps[0.0] + 0.2, gaps
