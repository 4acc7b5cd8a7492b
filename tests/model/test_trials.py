"""Dreams tried in isolation (docs/design.md §3 step 3): k batched trials against peft one by one."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from model.decoding.loading import LoadedModel, tiny_model
from model.memory.wake import completion_logprobs
from model.sleep.trial_lora import AnswerLoglik, MultiLoRALinear, attach_multi_lora, rows_use
from model.sleep.trials import TrialRecipe, run_trial_peft, run_trials, score_trials, train_trials

DREAMS = [
    "the bank opens at nine and closes at five on weekdays",
    "a pin change needs the old pin and a new one of four digits",
    "tables for two can be booked up to a week ahead",
]
QUESTIONS = ["when does the bank open? ", "how long is a pin? ", "how far ahead can i book? "]
ANSWERS = ["at nine", "four digits", "a week"]
SEEDS = [11, 22, 33]
TOL = dict(rtol=1e-4, atol=1e-5)


def _kw(**over) -> TrialRecipe:
    kw = dict(steps=3, lr=1e-2, r=4, alpha=8, target_modules=["q_proj", "v_proj"], layers=[1, 3], max_length=96)
    return TrialRecipe(**{**kw, **over})


def _measure(lm: LoadedModel) -> AnswerLoglik:
    return AnswerLoglik(lm.model, lm.tokenizer, QUESTIONS, ANSWERS, max_length=64)


def _peft_one_by_one(lm: LoadedModel, dreams: list[str], kw: TrialRecipe) -> list:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return [
            run_trial_peft(lm.model, lm.tokenizer, d, _measure(lm), kw, seed=s, index=i, keep_weights=True)
            for i, (d, s) in enumerate(zip(dreams, SEEDS))
        ]


def _assert_same_trial(got, ref) -> None:
    assert got.error == ref.error
    torch.testing.assert_close(torch.tensor(got.losses), torch.tensor(ref.losses), **TOL)
    torch.testing.assert_close(got.final_loss, ref.final_loss, **TOL)
    torch.testing.assert_close(got.tau_before, ref.tau_before, **TOL)
    torch.testing.assert_close(got.tau_after, ref.tau_after, **TOL)
    assert got.weights.keys() == ref.weights.keys()
    for name in ref.weights:
        torch.testing.assert_close(got.weights[name], ref.weights[name], **TOL, msg=name)


def test_init_equals_peft_default_lora_init():
    from peft import LoraConfig, get_peft_model

    lm = tiny_model()
    lora = attach_multi_lora(lm.model, 3, 4, 8, ["q_proj", "v_proj"], [1, 3], SEEDS)
    ours = [lora.adapter_weights(i) for i in range(3)]
    lora.detach()
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], layers_to_transform=[1, 3], lora_dropout=0.0)
    for i, seed in enumerate(SEEDS):
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            pm = get_peft_model(lm.model, cfg)
        for name, mod in lm.model.named_modules():
            if hasattr(mod, "lora_A") and "default" in mod.lora_A:
                assert torch.equal(ours[i][f"{name}.lora_A"], mod.lora_A["default"].weight)
                assert torch.equal(ours[i][f"{name}.lora_B"], torch.zeros_like(mod.lora_B["default"].weight))
        pm.unload()


def test_multi_lora_linear_routes_each_row_to_its_adapter():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    m = MultiLoRALinear(base, k=3, r=2, alpha=4)
    with torch.no_grad():
        m.A.normal_()
        m.B.normal_()
    x = torch.randn(4, 7, 6)
    idx = torch.tensor([2, 0, 2, 1])
    m.row_adapter = idx
    y = m(x)
    for j, a in enumerate(idx.tolist()):
        want = base(x[j]) + 2.0 * (x[j] @ m.A[a].T) @ m.B[a].T
        torch.testing.assert_close(y[j], want)
    m.row_adapter = None
    torch.testing.assert_close(m(x), base(x), rtol=0, atol=0)
    m.row_adapter = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="routes 2 rows"):
        m(x)


@pytest.mark.parametrize(
    "over",
    [{}, {"layers": None, "grad_clip": 0.05, "weight_decay": 0.1}],
    ids=["top-layers", "all-layers-clipped"],
)
def test_batched_trials_equal_peft_one_by_one(over):
    lm = tiny_model()
    kw = _kw(**over)
    batched = run_trials(lm.model, lm.tokenizer, DREAMS, _measure(lm), kw, seeds=SEEDS, keep_weights=True)
    reference = _peft_one_by_one(lm, DREAMS, kw)
    for got, ref in zip(batched, reference):
        assert got.error is None
        _assert_same_trial(got, ref)
        assert got.losses[-1] < got.losses[0]  # the adapters did learn
    taus = [r.tau_after for r in batched]
    assert len(set(taus)) == 3  # three different adapters, three different measures


def test_base_unchanged_and_model_restored():
    lm = tiny_model()
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    names = [n for n, _ in lm.model.named_modules()]
    flags = [p.requires_grad for p in lm.model.parameters()]
    ids = torch.tensor([[3, 17, 42, 8, 99, 5]])
    with torch.no_grad():
        logits = lm.model(input_ids=ids).logits

    lora = attach_multi_lora(lm.model, 2, 4, 8, ["q_proj", "v_proj"], None, [0, 1])
    assert len(lora.modules) == 8
    with torch.no_grad(), lora.rows_use(torch.tensor([1])):  # B = 0: adapters add exactly nothing
        torch.testing.assert_close(lm.model(input_ids=ids).logits, logits, rtol=0, atol=0)
    lora.detach()
    lora.detach()  # idempotent

    run_trials(lm.model, lm.tokenizer, DREAMS, _measure(lm), _kw(), seeds=SEEDS)
    _peft_one_by_one(lm, DREAMS[:1], _kw())

    after = lm.model.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k], before[k]), k
    assert [n for n, _ in lm.model.named_modules()] == names
    assert [p.requires_grad for p in lm.model.parameters()] == flags
    assert not any(isinstance(m, MultiLoRALinear) for m in lm.model.modules())
    assert not hasattr(lm.model, "peft_config")
    with torch.no_grad():
        torch.testing.assert_close(lm.model(input_ids=ids).logits, logits, rtol=0, atol=0)


def test_trials_are_isolated():
    lm = tiny_model()
    kw = _kw()
    first = run_trials(lm.model, lm.tokenizer, DREAMS, _measure(lm), kw, seeds=SEEDS, keep_weights=True)
    other = DREAMS[:2] + ["an entirely different and rather longer dream about alarms set for seven in the morning"]
    second = run_trials(lm.model, lm.tokenizer, other, _measure(lm), kw, seeds=SEEDS, keep_weights=True)
    for i in (0, 1):
        _assert_same_trial(second[i], first[i])
    assert not math.isclose(second[2].losses[0], first[2].losses[0])


def test_nan_trial_is_rejected_and_the_others_go_on():
    lm = tiny_model()
    kw = _kw()
    clean = run_trials(lm.model, lm.tokenizer, DREAMS, _measure(lm), kw, seeds=SEEDS, keep_weights=True)

    measure = _measure(lm)
    tau_before = float(measure(None)[0])
    lm.model.requires_grad_(False)
    lora = attach_multi_lora(lm.model, 3, kw.r, kw.alpha, kw.target_modules, kw.layers, SEEDS)
    try:
        with torch.no_grad():
            lora.modules["model.layers.1.self_attn.v_proj"].B[1].fill_(float("nan"))
        poisoned = lora.adapter_weights(1)
        logs = train_trials(lora, lm.tokenizer, DREAMS, steps=kw.steps, lr=kw.lr, max_length=kw.max_length)
        results = score_trials(lora, logs, measure, tau_before)
        for res in results:
            res.weights = lora.adapter_weights(res.index)
    finally:
        lora.detach()

    bad = results[1]
    assert bad.error is not None and "non-finite SFT loss" in bad.error and "step 1" in bad.error
    assert bad.reward == 0 and not bad.improved and bad.tau_after is None
    assert math.isnan(bad.final_loss) and len(bad.losses) == 1
    for name, w in poisoned.items():  # its update was zeroed: the adapter is as it was
        torch.testing.assert_close(bad.weights[name], w, rtol=0, atol=0, equal_nan=True)
    for i in (0, 2):
        _assert_same_trial(results[i], clean[i])


def test_over_long_dream_is_rejected_before_training():
    lm = tiny_model()
    kw = _kw(max_length=40)
    dreams = ["short dream", "x" * 200, "another short one"]
    results = run_trials(lm.model, lm.tokenizer, dreams, _measure(lm), kw, seeds=SEEDS)
    assert results[1].error.startswith("rejected before training") and results[1].losses == []
    assert results[1].reward == 0 and results[1].tau_after is None
    assert all(results[i].error is None and len(results[i].losses) == 3 for i in (0, 2))
    nothing = run_trials(lm.model, lm.tokenizer, ["y" * 100, "z" * 100], _measure(lm), kw, seeds=[1, 2])
    assert all(r.error.startswith("rejected before training") and r.reward == 0 for r in nothing)


def test_reward_is_one_iff_tau_improved():
    lm = tiny_model()
    after = torch.tensor([0.5, -0.5, 0.0])

    def fake(adapters):
        return torch.zeros(1) if adapters is None else after[adapters]

    results = run_trials(lm.model, lm.tokenizer, DREAMS, fake, _kw(steps=1), seeds=SEEDS)
    assert [(r.improved, r.reward) for r in results] == [(True, 1), (False, 0), (False, 0)]
    assert all(r.tau_before == 0.0 for r in results)

    # For real: training on the very answer raises its log-likelihood.
    measure = AnswerLoglik(lm.model, lm.tokenizer, ["note: "], [DREAMS[0]], max_length=96)
    real = run_trials(lm.model, lm.tokenizer, DREAMS[:1], measure, _kw(steps=5), seeds=SEEDS[:1])
    assert real[0].tau_after > real[0].tau_before and real[0].reward == 1


def test_measure_is_batched_over_adapters():
    lm = tiny_model()
    lm.model.requires_grad_(False)
    measure = AnswerLoglik(lm.model, lm.tokenizer, QUESTIONS, ANSWERS, max_length=64, rows_per_pass=2)
    lora = attach_multi_lora(lm.model, 3, 4, 8, ["q_proj", "v_proj"], [2, 3], SEEDS)
    try:
        with torch.no_grad():
            for m in lora.modules.values():
                m.B.normal_(0, 0.3)
        taus = measure(torch.tensor([2, 0, 1, 0]))
        b = measure.batch
        for j, a in enumerate([2, 0, 1, 0]):  # reference: one adapter, the plain full forward
            with torch.no_grad(), rows_use(lm.model, torch.full((b.input_ids.shape[0],), a)):
                logp, n = completion_logprobs(lm.model, b)
            torch.testing.assert_close(taus[j], logp.sum() / n.sum(), **TOL)
        with pytest.raises(ValueError, match=r"\[0, 3\)"):
            measure(torch.tensor([3]))
    finally:
        lora.detach()
    with pytest.raises(ValueError, match="no multi-LoRA"):
        measure(torch.tensor([0]))


def test_bad_arguments():
    lm = tiny_model()
    with pytest.raises(ValueError, match="seeds"):
        attach_multi_lora(lm.model, 2, 4, 8, ["q_proj"], None, [0])
    with pytest.raises(ValueError, match="no module named"):
        attach_multi_lora(lm.model, 1, 4, 8, ["nope"], None, [0])
    with pytest.raises(ValueError, match="layers"):
        attach_multi_lora(lm.model, 1, 4, 8, ["q_proj"], [9], [0])
    lora = attach_multi_lora(lm.model, 1, 4, 8, ["q_proj"], None, [0])
    with pytest.raises(ValueError, match="already"):
        attach_multi_lora(lm.model, 1, 4, 8, ["v_proj"], None, [0])
    lora.detach()
