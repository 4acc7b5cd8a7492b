"""GKD divergences: exact values, limits, symmetry, gradients and masking."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from model.sleep.losses import distillation_loss, forward_kl, generalized_jsd, reverse_kl, token_divergence


def _pair(n: int = 6, v: int = 11, seed: int = 0, scale: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g) * scale, torch.randn(n, v, generator=g) * scale


def _np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _np_kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    return (p * (np.log(p) - np.log(q))).sum(axis=-1)


def _np_jsd(t: np.ndarray, s: np.ndarray, beta: float) -> np.ndarray:
    m = beta * t + (1 - beta) * s
    return beta * _np_kl(t, m) + (1 - beta) * _np_kl(s, m)


def test_identical_logits_give_zero() -> None:
    t, _ = _pair()
    for d in (forward_kl(t, t.clone()), reverse_kl(t, t.clone()), generalized_jsd(t, t.clone(), 0.5)):
        assert d.shape == (t.shape[0],)
        assert torch.allclose(d, torch.zeros_like(d), atol=1e-6)


def test_beta_endpoints_are_forward_and_reverse_kl() -> None:
    t, s = _pair()
    assert torch.equal(generalized_jsd(t, s, 0.0), forward_kl(t, s))
    assert torch.equal(generalized_jsd(t, s, 1.0), reverse_kl(t, s))


def test_divergences_are_non_negative() -> None:
    for seed in range(5):
        t, s = _pair(n=16, v=50, seed=seed)
        for d in (forward_kl(t, s), reverse_kl(t, s), *(generalized_jsd(t, s, b) for b in (0.1, 0.5, 0.9))):
            assert (d >= 0).all()


def test_forward_and_reverse_kl_differ() -> None:
    t, s = _pair()
    assert not torch.allclose(forward_kl(t, s), reverse_kl(t, s), rtol=1e-2)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_agrees_with_direct_numpy_computation(beta: float) -> None:
    rng = np.random.default_rng(3)
    t_np, s_np = rng.normal(size=(3, 5)) * 2, rng.normal(size=(3, 5)) * 2
    tp, sp = _np_softmax(t_np), _np_softmax(s_np)
    t, s = torch.tensor(t_np, dtype=torch.float32), torch.tensor(s_np, dtype=torch.float32)
    np.testing.assert_allclose(forward_kl(t, s).numpy(), _np_kl(tp, sp), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(reverse_kl(t, s).numpy(), _np_kl(sp, tp), rtol=1e-5, atol=1e-6)
    expected = _np_kl(tp, sp) if beta == 0 else _np_kl(sp, tp) if beta == 1 else _np_jsd(tp, sp, beta)
    np.testing.assert_allclose(generalized_jsd(t, s, beta).numpy(), expected, rtol=1e-5, atol=1e-6)


def test_kl_matches_hand_computed_two_token_value() -> None:
    t = torch.log(torch.tensor([[0.75, 0.25]]))
    s = torch.log(torch.tensor([[0.5, 0.5]]))
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert forward_kl(t, s).item() == pytest.approx(expected, rel=1e-6)


def test_jsd_limits_recover_the_kls() -> None:
    t, s = _pair(n=8, v=20, seed=1, scale=1.0)
    low, high = 1e-4, 1 - 1e-4
    torch.testing.assert_close(generalized_jsd(t, s, low) / low, forward_kl(t, s), rtol=1e-2, atol=0)
    torch.testing.assert_close(generalized_jsd(t, s, high) / (1 - high), reverse_kl(t, s), rtol=1e-2, atol=0)


@pytest.mark.parametrize("beta", [0.0, 0.2, 0.5, 0.7, 1.0])
def test_jsd_symmetric_under_swap_with_complementary_beta(beta: float) -> None:
    t, s = _pair(seed=2)
    torch.testing.assert_close(generalized_jsd(t, s, beta), generalized_jsd(s, t, 1 - beta), rtol=1e-5, atol=1e-6)


def test_low_precision_logits_are_computed_in_float32() -> None:
    t, s = _pair()
    d = generalized_jsd(t.bfloat16(), s.bfloat16(), 0.5)
    assert d.dtype == torch.float32
    torch.testing.assert_close(d, generalized_jsd(t.bfloat16().float(), s.bfloat16().float(), 0.5))


def test_neg_inf_logits_are_zero_probability_not_nan() -> None:
    t, s = _pair(n=2, v=6)
    t[:, :2] = -math.inf
    s = s.requires_grad_()
    for divergence in ("forward_kl", "jsd"):
        loss = distillation_loss(t, s, divergence, 0.5)
        loss.backward()
        assert torch.isfinite(loss)
        assert torch.isfinite(s.grad).all()
        s.grad = None


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_gradient_reaches_the_student_only(divergence: str) -> None:
    t, s = _pair()
    t.requires_grad_()
    s.requires_grad_()
    distillation_loss(t, s, divergence, 0.5).backward()
    assert t.grad is None
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_distillation_loss_value_is_mean_of_per_token_divergence() -> None:
    t, s = _pair()
    for divergence in ("forward_kl", "reverse_kl", "jsd"):
        expected = token_divergence(t, s, divergence, 0.3).mean()
        torch.testing.assert_close(distillation_loss(t, s, divergence, 0.3), expected)


def test_mask_selects_completion_tokens() -> None:
    t, s = _pair(n=6)
    mask = torch.tensor([True, False, True, False, False, True])
    per_token = generalized_jsd(t, s, 0.5)
    torch.testing.assert_close(distillation_loss(t, s, "jsd", 0.5, mask), per_token[mask].mean())
    # Changing masked-out rows leaves the loss unchanged.
    s2 = s.clone()
    s2[~mask] = torch.randn(int((~mask).sum()), s.shape[1])
    torch.testing.assert_close(distillation_loss(t, s2, "jsd", 0.5, mask), distillation_loss(t, s, "jsd", 0.5, mask))
    # Masked-out rows get no gradient.
    s.requires_grad_()
    distillation_loss(t, s, "forward_kl", 0.5, mask).backward()
    assert (s.grad[~mask] == 0).all() and (s.grad[mask] != 0).any()


def test_bad_inputs_raise() -> None:
    t, s = _pair(n=4, v=5)
    with pytest.raises(ValueError, match="divergence"):
        distillation_loss(t, s, "kl", 0.5)  # type: ignore[arg-type]
    for beta in (-0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match="beta"):
            distillation_loss(t, s, "jsd", beta)
        with pytest.raises(ValueError, match="beta"):
            generalized_jsd(t, s, beta)
    with pytest.raises(ValueError, match="beta"):
        distillation_loss(t, s, "forward_kl", 2.0)
    with pytest.raises(ValueError, match="shape"):
        distillation_loss(t, s[:, :4], "forward_kl", 0.5)
    with pytest.raises(ValueError, match="shape"):
        forward_kl(t, s[:3])
    with pytest.raises(ValueError, match="no tokens"):
        distillation_loss(t, s, "jsd", 0.5, torch.zeros(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask"):
        distillation_loss(t, s, "jsd", 0.5, torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask"):
        distillation_loss(t, s, "jsd", 0.5, torch.ones(4))


@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.1),
                                             ("jsd", 0.9), ("jsd", 0.0), ("jsd", 1.0)])
def test_the_closed_form_gradient_is_autograds_through_the_divergence(divergence: str, beta: float) -> None:
    """distillation_loss's backward is written out (losses._StudentDivergence); it must be the gradient that
    autograd takes through token_divergence, for every divergence, with a mask, -inf teacher logits and in float64
    to the last digits (gradcheck), and its value the same to the bit."""
    t, s = _pair(n=7, v=13, seed=3, scale=3.0)
    if divergence == "forward_kl" or (divergence == "jsd" and beta < 1):  # KL(S || T) is infinite where T is 0
        t[:, :2] = -math.inf
    mask = torch.tensor([True, False, True, True, False, True, True])
    fused, plain = s.clone().requires_grad_(), s.clone().requires_grad_()
    value = distillation_loss(t, fused, divergence, beta, mask)
    value.backward()
    reference = token_divergence(t, plain, divergence, beta)[mask].mean()
    reference.backward()
    assert value.item() == reference.item()
    torch.testing.assert_close(fused.grad, plain.grad, rtol=1e-5, atol=1e-7)
    assert (fused.grad[~mask] == 0).all() and fused.grad[mask].abs().sum() > 0
    s64 = s.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: distillation_loss(t.double(), x, divergence, beta, mask), (s64,))


def test_the_closed_form_gradient_keeps_the_students_dtype() -> None:
    t, s = _pair()
    s = s.bfloat16().requires_grad_()
    distillation_loss(t.bfloat16(), s, "jsd", 0.5).backward()
    assert s.grad.dtype == torch.bfloat16 and torch.isfinite(s.grad).all()
