"""The EWC baseline (docs/design.md §5): elastic weight consolidation and the per-example gradients of its Fisher.

:class:`EWC` (Kirkpatrick et al. 2017, online form of Schwarz et al. 2018) keeps a
diagonal Fisher and an anchor per earlier task; its quadratic ``penalty`` is added to
the loss of :func:`model.evaluation.baselines.train_sequential`. The Fisher is built
from every example's own squared gradient (:func:`per_example_squared_grads`), taken
from one batched pass where the parameters are those of linear layers.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from model.decoding.forward import Batch
from model.memory.wake import completion_logprobs, encode, sft_loss


# --- Per-example gradients ------------------------------------------------------------


def _linear_owners(model: nn.Module, params: Sequence[nn.Parameter]) -> list[tuple[nn.Linear, str]] | None:
    """For each parameter, the :class:`nn.Linear` it is the weight or bias of; None if any is not.

    A parameter registered anywhere else as well (a tied embedding, say) gets gradient
    from outside the linear layer, so it also makes this None.
    """
    places: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            places.setdefault(id(p), []).append((module, name))
    owners = []
    for p in params:
        where = places.get(id(p), [])
        if len(where) != 1 or not isinstance(where[0][0], nn.Linear):
            return None
        owners.append(where[0])
    return owners  # type: ignore[return-value]


def _per_example_linear(x: torch.Tensor, gy: torch.Tensor, onehot: torch.Tensor, name: str) -> torch.Tensor:
    """Per-example gradients of a linear layer's ``weight`` (E, out, in) or ``bias`` (E, out).

    x (N, in) are the layer's inputs and gy (N, out) the loss gradients at its outputs,
    token by token; onehot (E, N) says which example each token belongs to. Example e's
    weight gradient is ``sum_{t in e} gy_t x_t^T``; the smaller of in/out is expanded
    per example, so memory is E * N * min(in, out).
    """
    if name == "bias":
        return onehot @ gy
    if x.shape[1] <= gy.shape[1]:
        return gy.T[None] @ (onehot[:, :, None] * x[None])  # (1, out, N) @ (E, N, in)
    return (onehot[:, None, :] * gy.T[None]) @ x[None]  # (E, out, N) @ (1, N, in)


def per_example_squared_grads(model: PreTrainedModel, params: Sequence[nn.Parameter], batch: Batch) -> list[torch.Tensor]:
    """``sum_e (d loss_e / d theta)^2`` over the batch's examples, one float32 tensor per parameter.

    ``loss_e`` is example e's mean NLL per completion token (:func:`model.memory.wake.sft_loss`
    of that example alone). Where every parameter is the weight or bias of an
    :class:`nn.Linear` (LoRA adapters, projections), one forward/backward pass serves
    the whole batch: hooks keep each such layer's inputs and the gradients at its
    outputs, and example e's gradient is ``sum_{t in e} gy_t x_t^T`` (packed examples
    never see each other). The per-example gradients must add up to the batch gradient,
    which autograd computes alongside; if they do not (a weight also used outside its
    module), or any parameter is not a linear layer's, each example gets its own pass.
    """
    params = list(params)
    batch = batch.to(model.device)
    owners = _linear_owners(model, params)
    if owners is not None:
        fast = _hooked_squared_grads(model, params, owners, batch)
        if fast is not None:
            return fast
    out = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    for e in range(batch.n_examples):
        keep = batch.segment == e
        rows = keep.any(dim=1)
        one = Batch(batch.input_ids[rows], batch.position_ids[rows], torch.where(keep[rows], 0, -1),
                    batch.completion_mask[rows] & keep[rows], 1)
        with torch.enable_grad():
            grads = torch.autograd.grad(sft_loss(model, one), params, allow_unused=True)
        for o, g in zip(out, grads):
            if g is not None:
                o.add_(g.detach().float().pow(2))
    return out


def _hooked_squared_grads(
    model: PreTrainedModel, params: list[nn.Parameter], owners: list[tuple[nn.Linear, str]], batch: Batch
) -> list[torch.Tensor] | None:
    """The one-pass path of :func:`per_example_squared_grads`; None if its check fails."""
    modules = list({id(m): m for m, _ in owners}.values())
    calls: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {id(m): [] for m in modules}

    def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        calls[id(module)].append((args[0], output))

    handles = [m.register_forward_hook(record) for m in modules]
    try:
        with torch.enable_grad():
            logp, n = completion_logprobs(model, batch)
            loss = (-logp / n.clamp(min=1)).sum()  # sum of per-example losses: its gradient splits by example
            outputs = [y for m in modules for _, y in calls[id(m)]]
            grads = torch.autograd.grad(loss, [*outputs, *params], allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    gys, batch_grads = iter(grads[: len(outputs)]), grads[len(outputs) :]
    tokens = batch.segment.flatten()
    real = tokens >= 0
    onehot = (tokens[real][None, :] == torch.arange(batch.n_examples, device=tokens.device)[:, None]).float()  # (E, N)
    per_module: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for m in modules:
        per_module[id(m)] = []
        for x, _ in calls[id(m)]:
            gy = next(gys)
            if gy is None:
                continue
            x = x.detach().float().reshape(-1, x.shape[-1])[real]
            per_module[id(m)].append((x, gy.detach().float().reshape(-1, gy.shape[-1])[real]))
    out = []
    for p, (m, name), full in zip(params, owners, batch_grads):
        per_example = sum((_per_example_linear(x, gy, onehot, name) for x, gy in per_module[id(m)]),
                          torch.zeros((batch.n_examples, *p.shape), device=p.device))
        total = torch.zeros_like(p, dtype=torch.float32) if full is None else full.float()
        if not torch.allclose(per_example.sum(0), total, rtol=1e-3, atol=1e-6 * float(total.abs().max()) + 1e-12):
            warnings.warn("per-example gradients from the linear layers' hooks do not add up to the batch gradient "
                          "(a weight used outside its module?): one pass per example instead", stacklevel=3)
            return None
        out.append(per_example.pow(2).sum(0))
    return out


# --- EWC ------------------------------------------------------------------------------


class EWC:
    """Elastic weight consolidation (Kirkpatrick et al. 2017), online form (Schwarz et al. 2018).

    After each task, :meth:`consolidate` estimates the diagonal Fisher F of the
    task's SFT loss at the learned weights theta*, and :meth:`penalty` then returns
    ``lam / 2 * sum_k F_k (theta_k - theta*_k)^2`` over ``params``, which pulls
    the weights that mattered for earlier tasks back to where they were.

    Over several tasks the Fisher is accumulated as ``F <- gamma * F + F_task``
    (``gamma = 1``: the sum over tasks, one penalty with the summed importance, which
    equals the sum of per-task penalties' curvature; ``gamma < 1`` decays old tasks)
    and the anchor theta* is the weights after the latest task.

    The empirical Fisher is the squared gradient of the task loss, so it vanishes as
    that loss goes to zero: consolidating a task the model has memorised gives a weak
    penalty whatever lambda is (the scale of lambda depends on how well tasks are fit).
    """

    def __init__(self, params: Sequence[nn.Parameter], lam: float, gamma: float = 1.0) -> None:
        if lam < 0:
            raise ValueError(f"EWC lambda must be non-negative, got {lam}")
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"EWC gamma must be in [0, 1], got {gamma}")
        self.params = list(params)
        self.lam = lam
        self.gamma = gamma
        self.fisher: list[torch.Tensor] | None = None
        self.anchor: list[torch.Tensor] | None = None
        self.n_tasks = 0

    @staticmethod
    def fisher_diagonal(
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        params: Sequence[nn.Parameter],
        prompts: Sequence[str],
        completions: Sequence[str],
        batch_size: int,
        max_length: int,
    ) -> list[torch.Tensor]:
        """Empirical diagonal Fisher: the mean over examples of the squared per-example gradient.

        ``F_k = 1/N sum_e (d loss_e / d theta_k)^2`` with ``loss_e`` the mean NLL per
        completion token of example e's gold completion (the empirical Fisher uses the
        data labels, not samples from the model). One tensor per parameter, of its shape
        (float32, on its device). ``batch_size`` examples share a forward/backward pass
        and each still gets its own gradient (the result does not depend on it, up to
        float rounding): see :func:`per_example_squared_grads`. The model is run in eval
        mode (no dropout); parameters' ``.grad`` are not touched.
        """
        params = list(params)
        if not prompts:
            raise ValueError("fisher_diagonal needs at least one example")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        fisher = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        was_training = model.training
        model.eval()
        try:
            for start in range(0, len(prompts), batch_size):
                end = start + batch_size
                batch = encode(tokenizer, prompts[start:end], completions[start:end], max_length)
                for f, sq in zip(fisher, per_example_squared_grads(model, params, batch)):
                    f.add_(sq)
        finally:
            model.train(was_training)
        return [f / len(prompts) for f in fisher]

    def consolidate(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        prompts: Sequence[str],
        completions: Sequence[str],
        batch_size: int,
        max_length: int,
    ) -> list[torch.Tensor]:
        """End of a task: add its Fisher (``F <- gamma F + F_task``) and anchor at the current weights.

        Returns the task's own Fisher diagonal.
        """
        task_fisher = self.fisher_diagonal(model, tokenizer, self.params, prompts, completions, batch_size, max_length)
        if self.fisher is None:
            self.fisher = task_fisher
        else:
            self.fisher = [self.gamma * f + t for f, t in zip(self.fisher, task_fisher)]
        self.anchor = [p.detach().clone() for p in self.params]
        self.n_tasks += 1
        return task_fisher

    def penalty(self) -> torch.Tensor:
        """``lam / 2 * sum F (theta - theta*)^2`` (a scalar with grad); 0 before any consolidation."""
        if self.fisher is None or self.anchor is None:
            return torch.zeros((), device=self.params[0].device if self.params else "cpu")
        total = sum(
            (f * (p.float() - a.float()).pow(2)).sum() for p, f, a in zip(self.params, self.fisher, self.anchor)
        )
        return 0.5 * self.lam * total


__all__ = ["EWC", "per_example_squared_grads"]
