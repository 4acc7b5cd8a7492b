"""model/runtime.py: the torch settings every stage starts with, and the race they remove."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from model.runtime import configure_torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def torch_settings() -> Iterator[None]:
    """Restore this test process's torch settings after the test."""
    saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(), torch.utils.deterministic.fill_uninitialized_memory)
    yield
    torch.set_num_threads(saved[0])
    torch.use_deterministic_algorithms(saved[1], warn_only=saved[2])
    torch.utils.deterministic.fill_uninitialized_memory = saved[3]


def test_configure_torch_sets_threads_and_deterministic_algorithms(torch_settings) -> None:
    configure_torch(1, deterministic=True)
    assert torch.get_num_threads() == 1
    assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    assert torch.utils.deterministic.fill_uninitialized_memory is False  # no NaN fill of every torch.empty
    configure_torch(2, deterministic=False)
    assert torch.get_num_threads() == 2 and not torch.are_deterministic_algorithms_enabled()
    with pytest.raises(ValueError, match="threads must be at least 1"):
        configure_torch(0)


def test_repeated_index_gradients_accumulate_in_index_order_on_two_threads(torch_settings) -> None:
    """The backward of ``hidden[rows, cols]`` with repeated (row, col) pairs (grouped_logprobs gathers a prompt's
    last position once per continuation) is an accumulating index_put. On two threads and at least 32768 floats
    torch runs it with atomic adds unless deterministic algorithms are on, and the sum's order, so its last bits,
    follow thread timing. Under configure_torch it is the serial sum in index order: checked to the bit against
    that sum written out."""
    configure_torch(2, deterministic=True)
    gen = torch.Generator().manual_seed(0)
    rows, cols, d, copies = 8, 64, 96, 3  # 8 * 64 positions, each gathered 3 times: 3 * 512 * 96 > 32768 floats
    hidden = torch.randn(rows, cols, d, generator=gen, requires_grad=True)
    r = torch.arange(rows).repeat_interleave(cols).repeat(copies)
    c = torch.arange(cols).repeat(rows).repeat(copies)
    upstream = torch.randn(copies * rows * cols, d, generator=gen) * torch.logspace(-8, 8, d)  # rounding matters
    hidden[r, c].backward(upstream)
    n = rows * cols
    expected = torch.zeros(n, d)
    for k in range(copies):  # serial, in index order: ((0 + g0) + g1) + g2 for every position
        expected = expected + upstream[k * n : (k + 1) * n]
    assert torch.equal(hidden.grad.view(n, d), expected)
    assert not torch.equal(upstream[:n] + (upstream[n : 2 * n] + upstream[2 * n :]), expected)  # order shows


def test_every_task_sets_its_threads_through_configure_torch() -> None:
    """A task that set torch's threads itself would skip the deterministic algorithms (and wake.deterministic)."""
    offenders = []
    for path in sorted((ROOT / "tasks").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and ast.unparse(node.func) in ("torch.set_num_threads",
                                                                         "torch.use_deterministic_algorithms"):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []
    calls = sum(ast.unparse(n.func) == "configure_torch" for p in (ROOT / "tasks").rglob("*.py")
                for n in ast.walk(ast.parse(p.read_text(encoding="utf-8"))) if isinstance(n, ast.Call))
    assert calls >= 7  # wake, sleep, dream, evaluate, compare, knowledge, long context
