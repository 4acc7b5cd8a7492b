"""bench/routing_ceiling.py: the raw-data routers it reads the deployed router against, and its inputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.routing_ceiling import comparison_seeds, knn_route, logistic_route, one_run
from model.config import load_params

ROOT = Path(__file__).resolve().parents[2]


def _clusters(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[4.0, 0.0, 0.0], [0.0, 4.0, 0.0], [0.0, 0.0, 4.0]])
    periods = torch.arange(3).repeat_interleave(n)
    return centres[periods] + 0.3 * torch.randn(3 * n, 3, generator=gen), periods


def test_nearest_neighbours_take_the_majority_period_and_a_tie_goes_to_the_nearer():
    train, periods = _clusters(8, 0)
    test, truth = _clusters(5, 1)
    assert torch.equal(knn_route(train, periods, test, 1), truth)
    assert torch.equal(knn_route(train, periods, test, 5), truth)
    # two neighbours of different periods: the nearer one's
    two = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert knn_route(two, torch.tensor([0, 1]), torch.tensor([[0.9, 0.2], [0.2, 0.9]]), 2).tolist() == [0, 1]
    # a majority beats the nearest: two period-1 rows just behind one period-0 row
    three = torch.tensor([[1.0, 0.0], [0.98, 0.2], [0.97, 0.24]])
    assert knn_route(three, torch.tensor([0, 1, 1]), torch.tensor([[1.0, 0.01]]), 3).tolist() == [1]


def test_the_logistic_router_separates_separable_periods():
    train, periods = _clusters(10, 2)
    test, truth = _clusters(6, 3)
    assert torch.equal(logistic_route(train, periods, test), truth)


def test_a_comparisons_seeds_carry_its_overrides_and_each_seed_draws_its_own_stream():
    seeds = comparison_seeds(ROOT / "params.yaml", "default")
    assert [p.seed for _, p in seeds] == [p.data.seed for _, p in seeds] == [0, 1, 2, 3, 4]
    assert {p.cms.routing.feature for _, p in seeds} == {"sentence"}  # the comparisons' router
    with pytest.raises(SystemExit, match="evaluation.comparisons has no 'nope'"):
        comparison_seeds(ROOT / "params.yaml", "nope")


def test_a_router_it_does_not_rebuild_is_refused_naming_where():
    params = load_params(ROOT / "params.yaml")  # the main job routes by a decoder layer
    with pytest.raises(SystemExit, match="main job: cms.routing must be feature sentence"):
        one_run("main job", params, ROOT)
