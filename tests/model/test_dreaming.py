"""Dreaming on a tiny model: generation in dream mode, importance, selection, trials, promotion."""

from __future__ import annotations

import math
import random
from dataclasses import asdict, replace

import pytest
import torch

from model.config import DreamConfig
from model.evaluation.knowledge import QA, Passage
from model.memory.wake import label_scores
from model.sleep.dreaming import (
    dream_about,
    dream_parameters,
    fast_parameters,
    generate_dreams,
    importance_scores,
    promote,
    select_dreams,
    sft_gradient,
    task_from_examples,
    task_from_passage,
    train_prompt,
    try_dreams,
)
from model.sleep.held_out import HeldOutScore, candidate_check, held_out_check, nothing_lost, training_helped
from model.sleep.trial_lora import AnswerLoglik
from tests.model.helpers import make_nonzero, tiny_with_cms

PASSAGE_RAW = Passage(
    title="Balance",
    context="The balance of the savings account is shown in the app. Money moves to savings every week.",
    questions=[QA("Where is the balance shown?", "in the app"), QA("When does money move?", "every week")],
)


def _cfg(**kw) -> DreamConfig:
    base = dict(dreams_per_context=4, max_new_tokens=12, min_new_tokens=4, top_k=2, random_extra=1, trial_steps=2, trial_lr=1e-2,
                lora_r=4, lora_alpha=8.0, rounds=1, rest_steps=1, promote_steps=3, lr=1e-2, max_length=96, chat=False)
    return DreamConfig(**{**base, **kw})


PASSAGE = task_from_passage(PASSAGE_RAW, "c0", _cfg())


def test_tasks_from_passages_and_from_labelled_examples():
    assert PASSAGE.tau_prompts[0] == "Question: Where is the balance shown?\nAnswer:"
    assert PASSAGE.tau_answers == (" in the app", " every week")
    ex = task_from_examples([("what is my balance", "balance"), ("book a table", "restaurant_reservation")],
                            [("how much money do i have", "balance")], "{text} -> {label}", "t0", _cfg())
    assert ex.context == "what is my balance -> balance\nbook a table -> restaurant reservation"
    assert ex.tau_prompts == ("how much money do i have -> ",) and ex.tau_answers == ("balance",)
    assert "{context}" in ex.prompt_template
    with pytest.raises(ValueError, match="has no questions"):
        task_from_passage(Passage("t", "c", []), "c9", _cfg())


def test_select_top_k_plus_random_is_seeded_and_skips_nan():
    scores = [0.1, math.nan, 0.9, 0.5, 0.3, 0.7]
    a = select_dreams(scores, 2, 2, random.Random(0))
    b = select_dreams(scores, 2, 2, random.Random(0))
    assert a == b
    assert [i for i, why in a.items() if why == "topk"] == [2, 5]
    assert len([i for i, why in a.items() if why == "random"]) == 2 and 1 not in a


def test_dream_mode_uses_random_experts_and_is_seeded():
    lm, cms = tiny_with_cms()
    cms.unlock(1, "x")
    cms.unlock(1, "y")  # three slow experts, top_k=2: the random expert matters
    make_nonzero(cms, 1)
    cfg = _cfg()
    p1, d1 = generate_dreams(lm.model, lm.tokenizer, cms, PASSAGE, cfg, seed=3)
    _, d2 = generate_dreams(lm.model, lm.tokenizer, cms, PASSAGE, cfg, seed=3)
    assert d1 == d2 and len(d1) == 4 and PASSAGE.context in p1
    with torch.no_grad():
        ids = lm.tokenizer(p1, return_tensors="pt")["input_ids"]
        plain = lm.model(ids).logits
        with cms.random_expert_routing(seed=3):
            dreamy = lm.model(ids).logits
    assert not torch.allclose(plain, dreamy)


def test_importance_norm_and_alignment_are_gradient_based():
    lm, cms = tiny_with_cms()
    params = fast_parameters(cms, "t")
    task = (list(PASSAGE.tau_prompts), list(PASSAGE.tau_answers))
    dreams = ["the balance is shown in the app", "zzzz qqqq", ""]
    with cms.trainable_only(params):
        norms = importance_scores(lm.model, lm.tokenizer, params, "Balance\n", dreams, task, "norm", 96)
        cos = importance_scores(lm.model, lm.tokenizer, params, "Balance\n", dreams, task, "alignment", 96)
        g = sft_gradient(lm.model, lm.tokenizer, params, ["Balance\n"], [dreams[0]], 96)
    assert norms[0] == pytest.approx(float(g.norm()), rel=1e-5)
    assert math.isnan(norms[2]) and math.isnan(cos[2])
    assert all(-1.0 <= c <= 1.0 for c in cos[:2]) and norms[0] > 0


def test_random_importance_is_seeded_noise_without_gradients():
    lm, cms = tiny_with_cms()
    params = fast_parameters(cms, "t")
    task = (list(PASSAGE.tau_prompts), list(PASSAGE.tau_answers))
    dreams = ["the balance is shown in the app", "zzzz qqqq", "", "another dream"]
    a = importance_scores(lm.model, lm.tokenizer, params, "Balance\n", dreams, task, "random", 96)
    b = importance_scores(lm.model, lm.tokenizer, params, "Balance\n", dreams, task, "random", 96)
    c = importance_scores(lm.model, lm.tokenizer, params, "Balance\n", dreams[::-1], task, "random", 96)
    assert a == b or all(math.isnan(x) and math.isnan(y) for x, y in zip(a, b) if x != y)
    assert math.isnan(a[2]) and all(0.0 <= x < 1.0 for i, x in enumerate(a) if i != 2)
    assert [x for x in a if x == x] != [x for x in c[::-1] if x == x]  # depends on the dreams, not their order alone
    assert all(p.grad is None for p in params)


def test_dream_round_rows_rewards_and_promotion_improve_tau():
    lm, cms = tiny_with_cms()
    cms.reset_level(0)  # as after a consolidation: the fast level is empty
    cfg = _cfg()
    rows = dream_about(lm.model, lm.tokenizer, cms, PASSAGE, cfg, period=0, seed=1)
    assert len(rows) == 4 and cms.active_slots(0) == [0]
    assert cms.experts[0][0].origin == "dream@period-0"
    chosen = [r for r in rows if r.selected]
    assert 1 <= len(chosen) <= 3 and {r.selection for r in chosen} <= {"topk", "random"}
    for r in rows:
        if r.selected and r.trial_error is None:
            assert r.reward == float(r.tau_after > r.tau_before)
        if not r.selected:
            assert math.isnan(r.reward) and math.isnan(r.tau_before)
    # Promotion trains the passage's facts (here: its own text as a stand-in dream) into the fast level.
    measure = AnswerLoglik(lm.model, lm.tokenizer, list(PASSAGE.tau_prompts), list(PASSAGE.tau_answers), 96)
    before = float(measure(None))
    qa_text = " ".join(f"{q.question} {q.answer}" for q in PASSAGE_RAW.questions)
    fast_before = [p.detach().clone() for p in cms.level_parameters(1)]
    losses = promote(lm.model, lm.tokenizer, cms, {"c0": PASSAGE}, [("c0", qa_text)] * 2, cfg.model_copy(update={"promote_steps": 15}), 0)
    assert losses[-1] < losses[0]
    assert float(measure(None)) > before
    assert all(torch.equal(a, b) for a, b in zip(fast_before, cms.level_parameters(1)))  # slow level untouched
    assert train_prompt(PASSAGE, cfg) == "Balance\n"


def test_the_trial_step_is_injectable_and_trials_one_by_one_equal_the_batched_pass():
    cfg = _cfg(rounds=2, trial_lr=0.05)
    lm, cms = tiny_with_cms()
    cms.reset_level(0)
    batched = dream_about(lm.model, lm.tokenizer, cms, PASSAGE, cfg, period=0, seed=1)

    calls = []

    def one_by_one(batch):
        calls.append((list(batch.dreams), list(batch.seeds), batch.cms.active_slots(0)))
        return [replace(try_dreams(replace(batch, dreams=[d], seeds=[s]))[0], index=i)
                for i, (d, s) in enumerate(zip(batch.dreams, batch.seeds))]

    lm2, cms2 = tiny_with_cms()
    cms2.reset_level(0)
    split = dream_about(lm2.model, lm2.tokenizer, cms2, PASSAGE, cfg, period=0, seed=1, run_trials_fn=one_by_one)
    assert len(calls) == 2 and all(slots == [0] for _, _, slots in calls)  # called with the dream expert unlocked
    assert [d for d, _, _ in calls] == [[r.text for r in batched if r.selected and r.round == k] for k in (0, 1)]
    for got, want in zip(split, batched):
        a, b = asdict(got), asdict(want)
        for key in ("tau_before", "tau_after"):
            assert a.pop(key) == pytest.approx(b.pop(key), rel=1e-4, abs=1e-5, nan_ok=True)
        assert a.keys() == b.keys() and all(a[k] == b[k] or (a[k] != a[k] and b[k] != b[k]) for k in a)  # NaN == NaN
    with pytest.raises(RuntimeError, match="returned 0 results for"):
        dream_about(lm2.model, lm2.tokenizer, cms2, PASSAGE, cfg, period=0, seed=1, run_trials_fn=lambda batch: [])


def test_the_promotion_check_scores_gold_among_candidates():
    scores = torch.tensor([[0.0, math.log(3.0)], [math.log(2.0), 0.0], [1.0, 1.0]])  # (N=3, C=2) log-likelihoods
    got = candidate_check(scores, torch.tensor([1, 1, 0]))
    # softmax of the rows: (1/4, 3/4), (2/3, 1/3), (1/2, 1/2); argmax of a tie is the first candidate
    assert got.logprob == pytest.approx((math.log(3 / 4) + math.log(1 / 3) + math.log(1 / 2)) / 3)
    assert got.accuracy == pytest.approx(2 / 3) and got.n == 3
    # Making every label likelier by the same amount changes nothing: the check measures telling labels apart.
    assert candidate_check(scores + 5.0, torch.tensor([1, 1, 0])) == got
    with pytest.raises(ValueError, match="do not match"):
        candidate_check(scores, torch.tensor([0, 1]))


def test_training_is_kept_only_if_the_check_set_improves_at_no_loss_of_accuracy():
    before = HeldOutScore(-1.0, 0.5, 8)
    assert training_helped(before, HeldOutScore(-0.9, 0.5, 8))
    assert not training_helped(before, HeldOutScore(-1.0, 0.75, 8))  # no rise in log-probability: not measurable help
    assert not training_helped(before, HeldOutScore(-0.5, 0.375, 8))  # likelier gold, but fewer right answers
    assert training_helped(HeldOutScore(-1.0, math.nan, 4), HeldOutScore(-0.99, math.nan, 4))  # passages: tau only
    assert not training_helped(before, HeldOutScore(math.nan, 0.5, 8))


def test_a_merge_is_kept_for_earlier_periods_only_if_their_inputs_lost_nothing():
    """dream.check_merged_periods: an unchanged score passes (nothing was meant to improve there); any fall in
    log-probability or accuracy, or a NaN, fails."""
    before = HeldOutScore(-1.0, 0.5, 8)
    assert nothing_lost(before, before) and nothing_lost(before, HeldOutScore(-0.9, 0.625, 8))
    assert not nothing_lost(before, HeldOutScore(-1.0001, 0.5, 8))
    assert not nothing_lost(before, HeldOutScore(-0.5, 0.375, 8))
    assert not nothing_lost(before, HeldOutScore(math.nan, 0.5, 8))


def test_the_held_out_check_scores_as_evaluation_does():
    lm, cms = tiny_with_cms()
    make_nonzero(cms, 0)
    examples = [("what is my balance", "balance"), ("book a table", "restaurant"), ("wake me at six", "alarm")]
    labels = ["alarm", "balance", "restaurant"]
    got = held_out_check(lm.model, lm.tokenizer, cms, "{text} -> {label}", examples, labels, 2, 32)
    scores = label_scores(lm.model, lm.tokenizer, "{text} -> {label}", [x for x, _ in examples], labels, 2, 32)
    assert got == candidate_check(scores, torch.tensor([1, 2, 0]))  # no prototypes: every expert on, as evaluate
    with pytest.raises(ValueError, match=r"\['weather'\] are not among the candidate labels"):
        held_out_check(lm.model, lm.tokenizer, cms, "{text} -> {label}", [("rain?", "weather")], labels, 2, 32)


def test_dreams_train_the_fast_level_or_the_expert_this_sleep_consolidated():
    lm, cms = tiny_with_cms()
    cms.begin_period(1)
    slot = cms.unlock(1, origin="consolidation:fast->slow@period-1")
    fast = dream_parameters(cms, _cfg(), 1, origin="dream@period-1")
    assert {id(p) for p in fast} == {id(p) for p in cms.level_parameters(0, cms.active_slots(0))}
    into_slow = dream_parameters(cms, _cfg(train_into="consolidated"), 1, origin="dream@period-1")
    assert {id(p) for p in into_slow} == {id(p) for p in cms.level_parameters(1, [slot])}
    # A sleep that consolidated nothing for this period: the fast level, as before.
    again = dream_parameters(cms, _cfg(train_into="consolidated"), 2, origin="dream@period-2")
    assert {id(p) for p in again} == {id(p) for p in fast}
