"""GKD divergences for Knowledge Seeding: distilling a teacher into a student per token.

Sleep consolidates level l*-1 into a fresh expert of level l* by distillation
(paper 3.3, after GKD, Agarwal et al. 2024): the divergence F(T || S) between the
teacher's and the student's next-token distributions is averaged over the completion
tokens of a sequence. F is one of

* forward KL, KL(T || S): mode-covering, the student spreads mass over all of T's support;
* reverse KL, KL(S || T): mode-seeking, the student concentrates on T's modes;
* generalised JSD(beta) = beta KL(T || M) + (1 - beta) KL(S || M), M = beta T + (1 - beta) S,
  which interpolates between the two (GKD eq. 1, same convention as TRL).

Every function takes logits of shape (N, V) (any leading dims work; V is last) and
computes in at least float32, so bf16/fp16 logits do not lose the small differences
that KL terms are made of. The divergences are plain differentiable functions;
:func:`distillation_loss` is the training loss, which detaches the teacher.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

Divergence = Literal["forward_kl", "reverse_kl", "jsd"]
DIVERGENCES: tuple[str, ...] = ("forward_kl", "reverse_kl", "jsd")


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Log-softmax over the vocabulary in at least float32: (N, V) -> (N, V)."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    return torch.log_softmax(logits.to(dtype), dim=-1)


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) = sum_v p_v (log p_v - log q_v) from log-probabilities: (N, V) -> (N,).

    Tokens with p_v = 0 (e.g. logits of -inf from top-k filtering) contribute 0; the
    difference is zeroed before the product so that no NaN reaches the gradient.
    """
    diff = torch.where(torch.isneginf(log_p), torch.zeros_like(log_p), log_p - log_q)
    return (log_p.exp() * diff).sum(dim=-1)


def _check_beta(beta: float) -> None:
    """Reject a JSD weight outside [0, 1] (NaN included)."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")


def _check_shapes(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> None:
    """Teacher and student logits must both be (N, V) with the same N and V."""
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher and student logits differ in shape: {tuple(teacher_logits.shape)} "
            f"vs {tuple(student_logits.shape)}"
        )
    if teacher_logits.dim() < 1 or teacher_logits.shape[-1] == 0:
        raise ValueError(f"logits need a non-empty vocabulary dimension, got {tuple(teacher_logits.shape)}")


def forward_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Forward KL per token, KL(T || S) = sum_v T_v log(T_v / S_v): (N, V), (N, V) -> (N,)."""
    _check_shapes(teacher_logits, student_logits)
    return _kl(_log_probs(teacher_logits), _log_probs(student_logits))


def reverse_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Reverse KL per token, KL(S || T) = sum_v S_v log(S_v / T_v): (N, V), (N, V) -> (N,)."""
    _check_shapes(teacher_logits, student_logits)
    return _kl(_log_probs(student_logits), _log_probs(teacher_logits))


def generalized_jsd(teacher_logits: torch.Tensor, student_logits: torch.Tensor, beta: float) -> torch.Tensor:
    """Generalised Jensen-Shannon divergence per token (GKD eq. 1): (N, V), (N, V) -> (N,).

    JSD(beta) = beta KL(T || M) + (1 - beta) KL(S || M) with M = beta T + (1 - beta) S,
    where log M = logaddexp(log T + log beta, log S + log1p(-beta)) is computed in log
    space. As beta -> 0, JSD(beta) / beta -> KL(T || S); as beta -> 1,
    JSD(beta) / (1 - beta) -> KL(S || T). The endpoints themselves would be 0, so, as in
    TRL, beta == 0 is *defined* as forward KL and beta == 1 as reverse KL (a jump in
    scale at the endpoints, never a loss that vanishes). Swapping teacher and student
    together with beta -> 1 - beta leaves the value unchanged.
    """
    _check_beta(beta)
    if beta == 0.0:
        return forward_kl(teacher_logits, student_logits)
    if beta == 1.0:
        return reverse_kl(teacher_logits, student_logits)
    _check_shapes(teacher_logits, student_logits)
    log_t = _log_probs(teacher_logits)
    log_s = _log_probs(student_logits)
    log_m = torch.logaddexp(log_t + math.log(beta), log_s + math.log1p(-beta))
    return beta * _kl(log_t, log_m) + (1.0 - beta) * _kl(log_s, log_m)


def token_divergence(
    teacher_logits: torch.Tensor, student_logits: torch.Tensor, divergence: Divergence, beta: float
) -> torch.Tensor:
    """The divergence F(T || S) named by ``divergence``, per token: (N, V), (N, V) -> (N,)."""
    if divergence == "forward_kl":
        return forward_kl(teacher_logits, student_logits)
    if divergence == "reverse_kl":
        return reverse_kl(teacher_logits, student_logits)
    if divergence == "jsd":
        return generalized_jsd(teacher_logits, student_logits, beta)
    raise ValueError(f"unknown divergence {divergence!r}; expected one of {DIVERGENCES}")


def _student_gradient(log_s: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The softmax chain rule from d F / d s (given up to a per-row constant) to d F / d student logits.

    log_s: (N, V) the student's log-probabilities; g: (N, V) with dF/ds_v = g_v + c for any c per row.
    Returns s * (g - sum_u s_u g_u): (N, V), written into ``g``.
    """
    s = log_s.exp()
    g.sub_((s * g).sum(dim=-1, keepdim=True))
    return g.mul_(s)


class _StudentDivergence(torch.autograd.Function):
    """F(T || S) per token, (N, V), (N, V) -> (N,), with the student's gradient in closed form.

    The value is :func:`token_divergence`'s, operation for operation; the backward pass is one
    expression instead of autograd's replay of every step of the forward pass (a consolidation
    step's loss over a 49k vocabulary spent as long in autograd as in the model's head):

    * forward KL, KL(T || S): dF/dz_S = S - T;
    * reverse KL, KL(S || T): dF/dz_S = S * (g - E_S[g]), g = log S - log T;
    * JSD(beta): dF/dz_S = S * (g - E_S[g]), g = (1 - beta) (log S - log M) (the terms from
      M's dependence on S sum to a constant, which the softmax removes).

    The teacher gets no gradient (distillation detaches it). 0 < beta < 1 for ``jsd``; its
    endpoints arrive here as ``forward_kl`` / ``reverse_kl`` (:func:`generalized_jsd`'s convention).
    """

    @staticmethod
    def forward(ctx, teacher_logits: torch.Tensor, student_logits: torch.Tensor, divergence: str,
                beta: float) -> torch.Tensor:
        log_t, log_s = _log_probs(teacher_logits), _log_probs(student_logits)
        if divergence == "forward_kl":
            value = _kl(log_t, log_s)
            ctx.save_for_backward(log_t, log_s)
        elif divergence == "reverse_kl":
            value = _kl(log_s, log_t)
            ctx.save_for_backward(log_s, log_t)
        else:
            log_m = torch.logaddexp(log_t + math.log(beta), log_s + math.log1p(-beta))
            value = beta * _kl(log_t, log_m) + (1.0 - beta) * _kl(log_s, log_m)
            ctx.save_for_backward(log_s, log_m)
        ctx.divergence, ctx.beta, ctx.dtype = divergence, beta, student_logits.dtype
        return value

    @staticmethod
    def backward(ctx, grad_value: torch.Tensor):  # type: ignore[override]
        a, b = ctx.saved_tensors
        if ctx.divergence == "forward_kl":  # a = log T, b = log S
            grad = b.exp().sub_(a.exp())
        else:  # a = log S, b = log T (reverse KL) or log M (JSD)
            g = torch.where(torch.isneginf(a), torch.zeros_like(a), a - b)
            grad = _student_gradient(a, g.mul_(1.0 - ctx.beta) if ctx.divergence == "jsd" else g)
        return None, grad.mul_(grad_value.unsqueeze(-1)).to(ctx.dtype), None, None


def _student_divergence(teacher_logits: torch.Tensor, student_logits: torch.Tensor, divergence: Divergence,
                        beta: float) -> torch.Tensor:
    """:func:`token_divergence` of a detached teacher, with the closed-form gradient of :class:`_StudentDivergence`."""
    if divergence == "jsd" and beta in (0.0, 1.0):  # generalized_jsd's endpoints
        divergence = "forward_kl" if beta == 0.0 else "reverse_kl"
    return _StudentDivergence.apply(teacher_logits, student_logits, divergence, beta)


def distillation_loss(
    teacher_logits: torch.Tensor,
    student_logits: torch.Tensor,
    divergence: Divergence,
    beta: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean per-token divergence F(T || S) over the completion tokens: a scalar loss.

    teacher_logits, student_logits: (N, V). mask: (N,) bool selecting the tokens that
    count (completion positions); None counts every row. The teacher is detached, so
    the gradient reaches only the student. ``beta`` is validated for every divergence
    and used only by ``"jsd"``. Raises ValueError for an unknown divergence, beta
    outside [0, 1], mismatched shapes, a mask that is not a bool tensor of shape
    (N,), or a mask that selects nothing.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; expected one of {DIVERGENCES}")
    _check_beta(beta)
    _check_shapes(teacher_logits, student_logits)
    per_token = _student_divergence(teacher_logits.detach(), student_logits, divergence, beta)
    if mask is None:
        if per_token.numel() == 0:
            raise ValueError("no tokens to average over")
        return per_token.mean()
    if mask.dtype != torch.bool or mask.shape != per_token.shape:
        raise ValueError(
            f"mask must be a bool tensor of shape {tuple(per_token.shape)}, "
            f"got {mask.dtype} {tuple(mask.shape)}"
        )
    if not bool(mask.any()):
        raise ValueError("mask selects no tokens")
    return per_token[mask].mean()
