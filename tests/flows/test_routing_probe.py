"""bench/routing_probe.py's score sum of two routers: its parts are exactly the routers it joins."""

from __future__ import annotations

import torch

from bench.routing_probe import prototype_scores
from model.memory.prototypes import add_period, route


def _prototypes(seed: int, d: int):
    """Three periods of two labels each in d dimensions, and noisy test features around period 1's labels."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(6, d, generator=g)
    protos = None
    for period in range(3):
        labels = [2 * period, 2 * period + 1]
        x = torch.cat([centres[y] + 0.5 * torch.randn(10, d, generator=g) for y in labels])
        protos = add_period(protos, x, period, 1, 7, seed=seed, metric="mahalanobis", shrinkage=0.5,
                            groups=[y for y in labels for _ in range(10)])
    test = centres[2:4].repeat(20, 1) + 1.5 * torch.randn(40, d, generator=g)
    return protos, test


def test_the_scores_argmax_is_the_mahalanobis_route() -> None:
    protos, test = _prototypes(0, 12)
    routed = route(protos, test)
    assert torch.equal(protos.periods[prototype_scores(protos, test).argmax(dim=1)], routed)
    assert len(set(routed.tolist())) > 1  # noisy enough that the routes differ


def test_a_score_sum_at_weight_0_or_1_is_one_router() -> None:
    a, xa = _prototypes(1, 12)
    b, xb = _prototypes(2, 20)
    assert torch.equal(a.periods, b.periods)
    sa, sb = prototype_scores(a, xa), prototype_scores(b, xb)
    assert torch.equal(a.periods[(1.0 * sa + 0.0 * sb).argmax(1)], route(a, xa))
    assert torch.equal(a.periods[(0.0 * sa + 1.0 * sb).argmax(1)], route(b, xb))
    assert not torch.equal(route(a, xa), route(b, xb))  # the two routers disagree somewhere, so the check can fail
