"""Baselines on a tiny model: LoRA, sequential fine-tuning, EWC, experience replay, in-context learning."""

from __future__ import annotations

import math
import random

import pytest
import torch

from model.decoding.loading import LoadedModel, tiny_model
from model.evaluation.baselines import (
    ReplayBuffer,
    SequentialStep,
    attach_lora,
    classify_in_context,
    icl_examples,
    icl_prompt_prefix,
    train_sequential,
)
from model.evaluation.ewc import EWC
from model.memory.wake import best_labels, completion_logprobs, encode, label_scores, sft_loss, split_template
from tests.model.helpers import logits, toy_batch

TEMPLATE = "{text} -> {label}"
TASK_A = [
    ("what is my balance", "balance"),
    ("how much money do i have", "balance"),
    ("wake me up at seven", "alarm"),
    ("set an alarm for six", "alarm"),
]
TASK_B = [
    ("book a table for two", "restaurant_reservation"),
    ("reserve a table tonight", "restaurant_reservation"),
    ("send money to my savings", "transfer"),
    ("transfer cash to my mom", "transfer"),
]


def pairs(task: list[tuple[str, str]]) -> tuple[list[str], list[str]]:
    split = [split_template(TEMPLATE, t, lab) for t, lab in task]
    return [p for p, _ in split], [c for _, c in split]


def task_loss(lm: LoadedModel, task: list[tuple[str, str]]) -> float:
    prompts, comps = pairs(task)
    with torch.no_grad():
        logp, n = completion_logprobs(lm.model, encode(lm.tokenizer, prompts, comps, 64))
    return float(-logp.sum() / n.sum())


def all_params(lm: LoadedModel) -> list[torch.nn.Parameter]:
    lm.model.requires_grad_(True)
    return list(lm.model.parameters())


# --- LoRA ----------------------------------------------------------------------------


def test_lora_trains_only_adapters_and_keeps_base_weights():
    lm = tiny_model(seed=0)
    base = {k: v.clone() for k, v in lm.model.state_dict().items()}
    before = logits(lm, toy_batch(lm))
    params = attach_lora(lm.model, r=4, alpha=8, targets=["q_proj", "v_proj"], seed=0)
    assert len(params) == 4 * 2 * 2  # 4 layers x (q, v) x (A, B)
    trainable = {id(p) for p in lm.model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in params}
    torch.testing.assert_close(logits(lm, toy_batch(lm)), before)  # B = 0: same function at init
    start = [p.detach().clone() for p in params]

    prompts, comps = pairs(TASK_A)
    losses = train_sequential(lm.model, lm.tokenizer, params, prompts, comps, batch_size=2, max_length=64,
                              epochs=15, lr=2e-2, grad_clip=1.0, seed=0)
    assert len(losses) == 30
    assert losses[-1] < 0.5 * losses[0]
    assert all(not torch.equal(p, s) for p, s in zip(params, start))
    after = lm.model.state_dict()
    for key, value in base.items():
        if "q_proj" in key or "v_proj" in key:
            key = key.replace(".weight", ".base_layer.weight")
        assert torch.equal(after[key], value), key
    assert not lm.model.training


def test_lora_is_seeded_and_rejects_unknown_targets():
    a = attach_lora(tiny_model(seed=0).model, r=2, alpha=4, targets=["q_proj"], seed=3)
    b = attach_lora(tiny_model(seed=0).model, r=2, alpha=4, targets=["q_proj"], seed=3)
    c = attach_lora(tiny_model(seed=0).model, r=2, alpha=4, targets=["q_proj"], seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
    with pytest.raises(ValueError):
        attach_lora(tiny_model(seed=0).model, r=2, alpha=4, targets=["no_such_proj"], seed=0)


# --- Sequential fine-tuning ----------------------------------------------------------


def test_sequential_uses_wakes_batches_in_order_and_is_deterministic():
    prompts, comps = pairs(TASK_A + TASK_B)  # 8 examples, batch 3: 3 steps per epoch
    runs = []
    for _ in range(2):
        lm = tiny_model(seed=1)
        steps: list[SequentialStep] = []
        losses = train_sequential(lm.model, lm.tokenizer, all_params(lm), prompts, comps, batch_size=3,
                                  max_length=64, epochs=2, lr=1e-3, grad_clip=1.0, seed=0, on_step=steps.append)
        runs.append(losses)
    assert len(losses) == 2 * math.ceil(8 / 3)
    expected = [prompts[s : s + 3] for s in (0, 3, 6)] * 2
    assert [s.prompts for s in steps] == expected
    assert [s.n_replayed for s in steps] == [0] * 6 and [s.penalty for s in steps] == [0.0] * 6
    assert runs[0] == runs[1]
    with pytest.raises(ValueError, match="requires_grad"):
        lm.model.requires_grad_(False)
        train_sequential(lm.model, lm.tokenizer, list(lm.model.parameters()), prompts, comps, 3, 64, 1, 1e-3, 1.0)


# --- EWC -----------------------------------------------------------------------------


def _fisher_reference(lm: LoadedModel, params, prompts, comps) -> list[torch.Tensor]:
    """The textbook empirical Fisher: one backward pass per example, squared, averaged."""
    ref = [torch.zeros_like(p) for p in params]
    for p_, c_ in zip(prompts, comps):
        sft_loss(lm.model, encode(lm.tokenizer, [p_], [c_], 64)).backward()
        for r, p in zip(ref, params):
            r += p.grad**2 / len(prompts)
        lm.model.zero_grad(set_to_none=True)
    return ref


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_fisher_is_per_example_whatever_the_batch_size(batch_size):
    # LoRA adapters (every one a linear layer's weight): one pass per batch, per-example gradients from hooks.
    lm = tiny_model(seed=0)
    params = attach_lora(lm.model, r=4, alpha=8.0, targets=["q_proj", "v_proj"], seed=1)
    with torch.no_grad():  # B starts at zero, which would make A's gradient vanish
        for p in params:
            p.normal_(0, 0.05, generator=torch.Generator().manual_seed(p.numel()))
    prompts, comps = pairs(TASK_A + TASK_B)
    passes = []
    hook = lm.model.get_decoder().register_forward_hook(lambda *_: passes.append(1))
    fisher = EWC.fisher_diagonal(lm.model, lm.tokenizer, params, prompts, comps, batch_size=batch_size, max_length=64)
    hook.remove()
    assert len(passes) == math.ceil(len(prompts) / batch_size)  # one pass per batch, not per example
    ref = _fisher_reference(lm, params, prompts, comps)
    for f, r, p in zip(fisher, ref, params):
        assert f.shape == p.shape and (f >= 0).all() and f.sum() > 0
        torch.testing.assert_close(f, r, rtol=1e-4, atol=1e-9)
    # Squaring per example is not squaring the batch mean: that would be several times smaller here.
    batch_sq = [g**2 for g in torch.autograd.grad(sft_loss(lm.model, encode(lm.tokenizer, prompts, comps, 64)), params)]
    assert sum(float(f.sum()) for f in fisher) > 2 * sum(float(b.sum()) for b in batch_sq)
    assert all(p.grad is None for p in params)  # the estimate leaves .grad alone


def test_fisher_of_parameters_outside_linear_layers_falls_back_to_one_pass_per_example():
    lm = tiny_model(seed=0)
    params = [lm.model.model.layers[0].self_attn.q_proj.weight, lm.model.model.norm.weight]
    for p in params:
        p.requires_grad_(True)
    prompts, comps = pairs(TASK_A)
    passes = []
    hook = lm.model.get_decoder().register_forward_hook(lambda *_: passes.append(1))
    fisher = EWC.fisher_diagonal(lm.model, lm.tokenizer, params, prompts, comps, batch_size=4, max_length=64)
    hook.remove()
    assert len(passes) == len(prompts)
    ref = _fisher_reference(lm, params, prompts, comps)
    for f, r, p in zip(fisher, ref, params):
        assert f.shape == p.shape and (f >= 0).all() and f.sum() > 0
        torch.testing.assert_close(f, r)
    assert all(p.grad is None for p in params)


def test_ewc_penalty_is_zero_at_the_anchor_and_quadratic_away_from_it():
    lm = tiny_model(seed=0)
    params = all_params(lm)
    ewc = EWC(params, lam=10.0)
    assert ewc.penalty().item() == 0.0  # nothing consolidated yet
    prompts, comps = pairs(TASK_A)
    fisher = ewc.consolidate(lm.model, lm.tokenizer, prompts, comps, batch_size=2, max_length=64)
    assert ewc.penalty().item() == 0.0
    g = torch.Generator().manual_seed(0)
    deltas = [torch.randn(p.shape, generator=g) * 1e-2 for p in params]
    with torch.no_grad():
        for p, d in zip(params, deltas):
            p += d
    expected = 0.5 * 10.0 * sum(float((f * d**2).sum()) for f, d in zip(fisher, deltas))
    pen = ewc.penalty()
    assert pen.requires_grad and pen.item() > 0
    assert pen.item() == pytest.approx(expected, rel=1e-4)
    # A second task adds its Fisher (gamma = 1) and moves the anchor to the current weights.
    fisher_b = ewc.consolidate(lm.model, lm.tokenizer, *pairs(TASK_B), batch_size=2, max_length=64)
    assert ewc.penalty().item() == 0.0
    for total, fa, fb in zip(ewc.fisher, fisher, fisher_b):
        torch.testing.assert_close(total, fa + fb)


def test_ewc_reduces_drift_of_important_weights_on_a_two_task_stream():
    lm = tiny_model(seed=0)
    params = all_params(lm)
    pa, ca = pairs(TASK_A)
    pb, cb = pairs(TASK_B)
    loss_b0 = task_loss(lm, TASK_B)
    # Few epochs: at a near-zero loss the empirical Fisher vanishes and so does the penalty.
    common = dict(batch_size=2, max_length=64, epochs=3, lr=5e-3, grad_clip=1.0, seed=0)
    train_sequential(lm.model, lm.tokenizer, params, pa, ca, **common)
    ewc = EWC(params, lam=1e4)
    ewc.consolidate(lm.model, lm.tokenizer, pa, ca, batch_size=1, max_length=64)
    after_a = {k: v.clone() for k, v in lm.model.state_dict().items()}
    loss_a = task_loss(lm, TASK_A)

    def train_b(penalty) -> tuple[float, float, float]:
        lm.model.load_state_dict(after_a)  # in place: ewc.params stay the model's parameters
        steps: list[SequentialStep] = []
        train_sequential(lm.model, lm.tokenizer, params, pb, cb, penalty=penalty, on_step=steps.append, **common)
        drift = sum(float((f * (p.detach() - a) ** 2).sum()) for f, p, a in zip(ewc.fisher, params, ewc.anchor))
        assert (max(s.penalty for s in steps) > 0) == (penalty is not None)
        return drift, task_loss(lm, TASK_A), task_loss(lm, TASK_B)

    drift_plain, forget_plain, learn_plain = train_b(None)
    drift_ewc, forget_ewc, learn_ewc = train_b(ewc.penalty)
    assert drift_ewc < 0.5 * drift_plain
    assert forget_ewc - loss_a < forget_plain - loss_a  # task A's loss rises less under EWC
    assert learn_ewc < 0.5 * loss_b0  # but task B is still learned


# --- Experience replay ---------------------------------------------------------------


def test_reservoir_keeps_capacity_and_samples_the_stream_uniformly():
    stream_a = [(f"a{i} -> ", "x") for i in range(50)]
    stream_b = [(f"b{i} -> ", "y") for i in range(50)]
    buf = ReplayBuffer(capacity=20, seed=0)
    buf.add(stream_a[:10])
    assert len(buf) == 10 and buf.items == stream_a[:10]  # below capacity: everything, in order
    buf.add(stream_a[10:])
    buf.add(stream_b)
    assert len(buf) == 20 and buf.seen == 100
    assert {c for _, c in buf.items} == {"x", "y"}  # both tasks kept
    assert len(set(buf.items)) == 20
    draw = buf.sample(5, random.Random(0))
    assert len(draw) == 5 and len(set(draw)) == 5 and set(draw) <= set(buf.items)
    assert len(buf.sample(50, random.Random(0))) == 20
    # Inclusion probability is capacity / n for the first and the last examples alike.
    first = last = 0
    for seed in range(1000):
        b = ReplayBuffer(capacity=10, seed=seed)
        b.add(stream_a)
        kept = set(b.items)
        first += sum(x in kept for x in stream_a[:10])
        last += sum(x in kept for x in stream_a[-10:])
    assert first / 10000 == pytest.approx(0.2, abs=0.02)
    assert last / 10000 == pytest.approx(0.2, abs=0.02)


def test_replay_extends_every_batch_and_reduces_forgetting():
    pa, ca = pairs(TASK_A)
    pb, cb = pairs(TASK_B)
    buf = ReplayBuffer(capacity=4, seed=0)
    buf.add(list(zip(pa, ca)))
    common = dict(batch_size=2, max_length=64, epochs=10, lr=5e-3, grad_clip=1.0, seed=0)
    results = {}
    for replay in (None, buf.items):
        lm = tiny_model(seed=0)
        params = all_params(lm)
        train_sequential(lm.model, lm.tokenizer, params, pa, ca, **common)
        steps: list[SequentialStep] = []
        train_sequential(lm.model, lm.tokenizer, params, pb, cb, replay=replay, replay_per_batch=2,
                         on_step=steps.append, **common)
        results[replay is not None] = task_loss(lm, TASK_A)
        if replay is not None:
            assert len(steps) == 20
            for i, s in enumerate(steps):
                start = 2 * (i % 2)
                assert s.n_replayed == 2 and s.prompts[:2] == pb[start : start + 2]
                assert set(zip(s.prompts[2:], s.completions[2:])) <= set(buf.items)
                assert len(set(s.prompts[2:])) == 2
            assert len({tuple(s.prompts[2:]) for s in steps}) > 1  # different draws per step
    assert results[True] < 0.5 * results[False]


# --- In-context learning -------------------------------------------------------------


def test_icl_examples_and_prefix():
    texts = [t for t, _ in TASK_A + TASK_B] + ["check my balance", "alarm at nine please"]
    labels = [lab for _, lab in TASK_A + TASK_B] + ["balance", "alarm"]
    ex = icl_examples(texts, labels, k=2, seed=0)
    assert [lab for _, lab in ex] == ["balance", "alarm", "restaurant_reservation", "transfer"] * 2
    assert all(labels[texts.index(t)] == lab for t, lab in ex) and len(set(ex)) == 8
    assert ex == icl_examples(texts, labels, k=2, seed=0)
    with pytest.raises(ValueError, match="fewer than k=3"):
        icl_examples(texts, labels, k=3, seed=0)
    prefix = icl_prompt_prefix(ex, TEMPLATE)
    lines = prefix.split("\n")
    assert lines[-1] == "" and len(lines) == 9
    assert lines[2] == f"{ex[2][0]} -> restaurant reservation"
    for lab in ("balance", "alarm", "restaurant reservation", "transfer"):
        assert sum(line.endswith(f"-> {lab}") for line in lines) == 2


def test_classify_in_context():
    lm = tiny_model(seed=0)
    texts = [t for t, _ in TASK_A]
    labels = ["balance", "alarm"]
    # An empty prefix is plain label-likelihood classification.
    assert classify_in_context(lm.model, lm.tokenizer, TEMPLATE, "", texts, labels, 8, 64) == best_labels(
        label_scores(lm.model, lm.tokenizer, TEMPLATE, texts, labels, 8, 64), labels)
    prefix = icl_prompt_prefix(TASK_A, TEMPLATE)
    pred = classify_in_context(lm.model, lm.tokenizer, TEMPLATE, prefix, texts, labels, 8, 128)
    assert len(pred) == len(texts) and set(pred) <= set(labels)
    n_prefix = len(lm.tokenizer(prefix)["input_ids"])
    with pytest.raises(ValueError, match="prefix alone"):
        classify_in_context(lm.model, lm.tokenizer, TEMPLATE, prefix, texts, labels, 8, n_prefix - 1)
    with pytest.raises(ValueError, match="need max_length >="):
        classify_in_context(lm.model, lm.tokenizer, TEMPLATE, prefix, texts, labels, 8, n_prefix + 2)
