"""Consolidation by Knowledge Seeding on a tiny model (docs/design.md §2)."""

from __future__ import annotations

import pytest
import torch

import model.sleep.consolidation as consolidation_module
from model.config import ConsolidationConfig, LevelConfig
from model.decoding.sampling import NonFiniteLogitsError
from model.memory.cms import CMSError, NoFreeSlotError
from model.memory.wake import encode
from model.sleep.consolidation import (
    EmptyPromptBufferError,
    PrefixCache,
    SplitForward,
    consolidate,
    due_consolidations,
    every_position,
)
from model.sleep.losses import distillation_loss
from tests.model.helpers import logits, make_nonzero, tiny_with_cms, toy_batch

PROMPTS = ["what is my balance -> ", "book a table for two -> ", "set an alarm for seven -> ", "how much money -> "]


def _levels(*chunks: int) -> list[LevelConfig]:
    return [LevelConfig(name=f"l{i}", chunk_size=c, lr=1e-3) for i, c in enumerate(chunks)]


def test_schedule_fires_at_multiples_of_the_slower_chunk():
    lv = _levels(1, 4)
    assert due_consolidations(0, 3, lv) == []
    assert due_consolidations(0, 4, lv) == [(0, 1)]
    assert due_consolidations(3, 9, lv) == [(0, 1)]  # 4 and 8 crossed: one consolidation
    assert due_consolidations(4, 7, lv) == []
    assert due_consolidations(0, 4, _levels(1, 2, 4)) == [(1, 2), (0, 1)]  # slowest pair first
    assert due_consolidations(0, 2, _levels(1, 2, 4)) == [(0, 1)]


def _cfg(**kw) -> ConsolidationConfig:
    base = dict(steps=30, batch_size=4, lr=2e-2, alpha=1.0, gamma=0.0, max_new_tokens=6, lti_prefixes=2,
                lti_group_size=3, on_policy_fraction=0.5, divergence="forward_kl")
    return ConsolidationConfig(**{**base, **kw})


def test_teacher_and_student_views_in_one_module():
    lm, cms = tiny_with_cms()
    make_nonzero(cms, 0)
    make_nonzero(cms, 1)
    batch = toy_batch(lm)
    full = logits(lm, batch)
    with cms.levels_masked([0]):
        fast_masked = logits(lm, batch)
    slot = cms.unlock(1, "test")
    with torch.no_grad():
        for bank in cms.banks(1):
            bank.B[slot].normal_(0, 0.5)  # the new expert now does something
    with cms.levels_masked([], hidden={1: [slot]}):  # teacher: the model as it was
        torch.testing.assert_close(logits(lm, batch), full, rtol=0, atol=0)
    with cms.levels_masked([0], hidden={1: [slot]}):
        torch.testing.assert_close(logits(lm, batch), fast_masked, rtol=0, atol=0)
    assert cms.active_slots(1) == [0, slot]  # views leave the state as it was


def _completion_logits(lm, batch) -> torch.Tensor:
    with torch.no_grad():
        out = lm.model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits
    return out.flatten(0, 1)[batch.completion_mask.flatten()]


def _fast_level_with_knowledge():
    """A CMS whose fast level holds "knowledge" (a strong, specific function); the probe, the teacher's
    logits on it, and the distillation gap once the fast level is masked."""
    lm, cms = tiny_with_cms()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for bank in cms.banks(0):
            bank.A[0].normal_(0, 0.3, generator=g)
            bank.B[0].normal_(0, 0.3, generator=g)
    make_nonzero(cms, 1, seed=4)
    probe = encode(lm.tokenizer, PROMPTS, ["balance", "restaurant", "alarm", "money"], 32)
    teacher = _completion_logits(lm, probe)
    with cms.levels_masked([0]):
        gap_reset = float(distillation_loss(teacher, _completion_logits(lm, probe), "forward_kl", 0.0))
    return lm, cms, probe, teacher, gap_reset


@pytest.mark.parametrize("alpha", [1.0, 0.7])
def test_consolidation_moves_knowledge_and_touches_only_the_new_expert(alpha):
    lm, cms, probe, teacher, gap_reset = _fast_level_with_knowledge()
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    res = consolidate(lm.model, lm.tokenizer, cms, 0, 1, PROMPTS, _cfg(alpha=alpha), 32, None, seed=0,
                      origin="consolidation:test")
    slot = res.slot
    assert cms.experts[1][slot].origin == "consolidation:test" and cms.active_slots(1) == [0, slot]
    assert cms.active_slots(0) == []  # fast level reset: masked and zeroed
    assert all(float(p.detach().abs().sum()) == 0 for p in cms.level_parameters(0))
    new = {id(p) for p in cms.level_parameters(1, [slot])}
    for n, p in lm.model.named_parameters():
        if id(p) in new:
            continue
        if ".levels.0." in n:
            continue  # reset above
        assert torch.equal(p, before[n]), n
    assert any(not torch.equal(p, before[n]) for n, p in lm.model.named_parameters() if id(p) in new)
    gap_after = float(distillation_loss(teacher, _completion_logits(lm, probe), "forward_kl", 0.0))
    # Pure GKD moves most of the fast level's function up; with imitation mixed in, still a clear gain.
    assert gap_after < (0.5 if alpha == 1.0 else 0.9) * gap_reset, (gap_reset, gap_after)
    assert len(res.steps) == 30 and res.steps[-1].distillation < res.steps[0].distillation
    kinds = {r["kind"] for r in res.samples}
    assert "teacher_data" in kinds and "on_policy" in kinds
    if alpha < 1:
        assert "imitation" in kinds
        assert all(0.0 <= r["reward"] <= 1.0 for r in res.samples if r["kind"] == "imitation")


def test_on_policy_sampling_prefills_the_prompts_trunk_once_and_draws_what_a_full_prefill_draws(monkeypatch):
    """The consolidation's samplings share one PromptTrunk: D fills it, every on-policy step after reuses it, and
    the sleep's samples and losses are those of samplings that prefill every prompt through every layer."""
    made = []

    class Recorded(consolidation_module.PromptTrunk):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)

    def run(trunk_class):
        monkeypatch.setattr(consolidation_module, "PromptTrunk", trunk_class)
        lm, cms, *_ = _fast_level_with_knowledge()
        return consolidate(lm.model, lm.tokenizer, cms, 0, 1, PROMPTS, _cfg(steps=6, on_policy_fraction=1.0), 32,
                           None, seed=0, origin="consolidation:test")

    full = run(lambda start, **k: None)  # no trunk: every sampling prefills every layer
    reused = run(Recorded)
    (trunk,) = made
    assert trunk.misses == len(PROMPTS)  # the teacher data D computed each prompt's trunk; no step did again
    assert trunk.hits >= 6 * 4  # 6 on-policy steps of batch 4
    assert all(s.on_policy for s in reused.steps)
    assert [(r["kind"], r["text"]) for r in reused.samples] == [(r["kind"], r["text"]) for r in full.samples]
    torch.testing.assert_close([r.loss for r in reused.steps], [r.loss for r in full.steps], rtol=1e-4, atol=1e-6)


def test_held_prefix_is_the_split_forwards_prefix_from_the_sampled_prompts_trunk(monkeypatch):
    monkeypatch.setattr(consolidation_module, "DISTILLATION_ROW_TOKENS", 32)  # rows of 32: several, with padding
    lm, cms, *_ = _fast_level_with_knowledge()
    split = SplitForward(lm.model, cms)
    trunk = consolidation_module.PromptTrunk(split.start)
    prompts = [*PROMPTS, PROMPTS[0]]  # a prompt twice: two examples with one cached prompt
    with cms.levels_masked([0]):
        comps = [s.text for s in consolidation_module.sample_continuations(lm.model, lm.tokenizer, prompts, 1, 6,
                                                                            trunk=trunk)]
    batch = consolidation_module.encode_distillation(lm.tokenizer, prompts, comps, 32)
    assert batch.input_ids.shape[0] > 1 and (batch.segment < 0).any()
    got = consolidation_module.held_prefix(trunk, lm.model, batch)
    want = split.prefix(batch)
    real = batch.segment >= 0
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)
    assert not got[~real].any()  # the padding: zeros, as PrefixCache leaves it
    other = consolidation_module.encode_distillation(lm.tokenizer, ["never sampled ->", PROMPTS[1]], ["x", "y"], 32)
    assert consolidation_module.held_prefix(trunk, lm.model, other) is None  # a prompt it does not hold
    cut = consolidation_module.encode_distillation(lm.tokenizer, PROMPTS[:2], ["x", "y"], 12)  # prompts cut (left)
    assert cut.n_tokens < sum(len(x) + 2 for x in lm.tokenizer(PROMPTS[:2])["input_ids"])
    assert consolidation_module.held_prefix(trunk, lm.model, cut) is None
    with torch.no_grad():  # the trunk changed since the sampling (here: trained; in a sleep: decoded in bf16)
        lm.model.get_input_embeddings().weight.mul_(1.01)
    assert consolidation_module.held_prefix(trunk, lm.model, batch) is None


def test_empty_prompt_buffer_and_bad_levels():
    lm, cms = tiny_with_cms()
    with pytest.raises(EmptyPromptBufferError, match="prompt buffer is empty"):
        consolidate(lm.model, lm.tokenizer, cms, 0, 1, [], _cfg(), 32, None, 0, "x")
    with pytest.raises(CMSError, match="cannot consolidate level 1 into level 3"):
        consolidate(lm.model, lm.tokenizer, cms, 1, 3, PROMPTS, _cfg(), 32, None, 0, "x")
    with pytest.raises(ValueError, match="semantic reward model"):
        consolidate(lm.model, lm.tokenizer, cms, 0, 1, PROMPTS, _cfg(alpha=0.5, gamma=0.5), 32, None, 0, "x")


def test_full_level_is_an_error_and_nothing_changes():
    lm, cms = tiny_with_cms()
    make_nonzero(cms, 0)
    cms.unlock(1, "a")
    cms.unlock(1, "b")
    fast = [p.detach().clone() for p in cms.level_parameters(0)]
    with pytest.raises(NoFreeSlotError):
        consolidate(lm.model, lm.tokenizer, cms, 0, 1, PROMPTS, _cfg(merge_when_full=False), 32, None, 0, "x")
    assert cms.active_slots(0) == [0]
    assert all(torch.equal(a, b) for a, b in zip(fast, cms.level_parameters(0)))


def test_nan_loss_aborts():
    lm, cms = tiny_with_cms()
    make_nonzero(cms, 0)
    with torch.no_grad():
        for bank in cms.banks(0):
            bank.B[0].fill_(float("nan"))
    with pytest.raises(NonFiniteLogitsError, match="non-finite logits"):  # the teacher samples already see NaN
        consolidate(lm.model, lm.tokenizer, cms, 0, 1, PROMPTS, _cfg(steps=2), 32, None, 0, "x")


def test_without_expansion_the_newest_slow_expert_learns_in_place_against_a_frozen_teacher():
    lm, cms, probe, teacher, gap_reset = _fast_level_with_knowledge()
    slow_before = [p.detach().clone() for p in cms.level_parameters(1, [0])]
    other_slots = [p.detach().clone() for p in cms.level_parameters(1, [1])]
    res = consolidate(lm.model, lm.tokenizer, cms, 0, 1, PROMPTS, _cfg(expand=False), 32, None, seed=0,
                      origin="consolidation:test")
    assert res.slot == 0 and cms.active_slots(1) == [0]  # no slot unlocked
    assert cms.active_slots(0) == []
    assert any(not torch.equal(a, b) for a, b in zip(slow_before, cms.level_parameters(1, [0])))
    assert all(torch.equal(a, b) for a, b in zip(other_slots, cms.level_parameters(1, [1])))
    gap_after = float(distillation_loss(teacher, _completion_logits(lm, probe), "forward_kl", 0.0))
    # One expert must now hold both its own function and the fast level's: less room than a new expert.
    assert gap_after < 0.75 * gap_reset, (gap_reset, gap_after)


def test_weights_swapped_restores_the_live_tensors():
    from model.sleep.consolidation import _weights_swapped

    p = torch.nn.Parameter(torch.ones(3))
    with _weights_swapped([p], [torch.zeros(3)]):
        assert float(p.sum()) == 0
    assert float(p.sum()) == 3
    with pytest.raises(RuntimeError), _weights_swapped([p], [torch.zeros(3)]):
        raise RuntimeError("boom")
    assert float(p.sum()) == 3


OLD_PROMPTS = ["play some jazz music -> ", "turn the lights off -> ", "call my mother now -> "]
OLD_LABELS = ["music", "lights", "call"]


def test_rehearsal_keeps_the_old_models_answers_on_old_task_inputs():
    """Distilled beside the new period's prompts, dreamed old-task inputs with the old model (fast level masked)
    as their teacher keep the new slow expert from rewriting what the model answered on them."""
    gaps = {}
    for rehearse in (False, True):
        lm, cms, _, _, _ = _fast_level_with_knowledge()
        probe = encode(lm.tokenizer, OLD_PROMPTS, OLD_LABELS, 32)
        with cms.levels_masked([0]):
            old = _completion_logits(lm, probe)  # what the slow level (the old model) answers
        pairs = list(zip(OLD_PROMPTS, OLD_LABELS)) if rehearse else []
        res = consolidate(lm.model, lm.tokenizer, cms, 0, 1, PROMPTS, _cfg(steps=40), 32, None, seed=0,
                          origin="consolidation:test", rehearsal=pairs, freeze=True)
        gaps[rehearse] = float(distillation_loss(old, _completion_logits(lm, probe), "forward_kl", 0.0))
        assert cms.experts[1][res.slot].frozen and cms.frozen_slots(1) == [res.slot]
    assert gaps[True] < 0.5 * gaps[False], gaps


def test_a_full_level_merges_its_two_oldest_experts_and_the_sleep_goes_on():
    lm, cms = tiny_with_cms()
    make_nonzero(cms, 0)
    for name in ("a", "b"):
        slot = cms.unlock(1, f"consolidation:{name}")
        cms.freeze(1, slot, "test")
    make_nonzero(cms, 1, seed=5)
    assert not cms.free_slots(1)
    res = consolidate(lm.model, lm.tokenizer, cms, 0, 1, PROMPTS, _cfg(steps=2, merge_steps=30), 32, None, 0, "x")
    assert res.merged is not None and res.merged.level == 1
    assert (res.merged.into, res.merged.freed) == (1, 2)  # the two oldest consolidated experts
    assert res.slot == 2 and cms.active_slots(1) == [0, 1, 2]
    assert cms.experts[1][1].frozen and any("merged" in h for h in cms.experts[1][1].history)
    assert all(e < 1.0 for e in res.merged.relative_error), res.merged


def test_fold_dreams_moves_the_fast_level_into_the_periods_expert_only():
    """A sleep's dreams, trained into the fast level, fold into the slow expert the same sleep consolidated:
    that expert (fast level masked) comes to answer as the dream-trained model did, no other expert moves,
    and the fast level is empty for the next wake."""
    from model.sleep.consolidation import fold_dreams, period_expert

    lm, cms, _, _, _ = _fast_level_with_knowledge()
    cms.begin_period(2)
    res = consolidate(lm.model, lm.tokenizer, cms, 0, 1, PROMPTS, _cfg(steps=5), 32, None, seed=0,
                      origin="consolidation:fast->slow@period-2", freeze=True)
    assert period_expert(cms, 1, 2) == res.slot and period_expert(cms, 1, 1) is None
    g = torch.Generator().manual_seed(9)  # the dream stage trains a fresh fast expert
    slot0 = cms.unlock(0, "dream@period-2")
    with torch.no_grad():
        for bank in cms.banks(0):
            bank.A[slot0].normal_(0, 0.3, generator=g)
            bank.B[slot0].normal_(0, 0.3, generator=g)
    probe = encode(lm.tokenizer, PROMPTS, ["balance", "restaurant", "alarm", "money"], 32)
    dreamt = _completion_logits(lm, probe)  # the dream-trained model
    with cms.levels_masked([0]):
        gap_before = float(distillation_loss(dreamt, _completion_logits(lm, probe), "forward_kl", 0.0))
    others = {s: [p.detach().clone() for p in cms.level_parameters(1, [s])] for s in cms.active_slots(1) if s != res.slot}
    folded = fold_dreams(lm.model, lm.tokenizer, cms, 2, PROMPTS, _cfg(steps=30), 32, None, seed=1)
    assert folded is not None and folded.slot == res.slot
    assert cms.active_slots(0) == [] and all(float(p.detach().abs().sum()) == 0 for p in cms.level_parameters(0))
    assert cms.experts[1][res.slot].frozen and cms.experts[1][res.slot].period == 2
    assert sorted(cms.active_slots(1)) == sorted([*others, res.slot])  # in place: no slot unlocked
    for s, vals in others.items():
        assert all(torch.equal(a, b) for a, b in zip(vals, cms.level_parameters(1, [s]))), s
    gap_after = float(distillation_loss(dreamt, _completion_logits(lm, probe), "forward_kl", 0.0))
    assert gap_after < 0.75 * gap_before, (gap_before, gap_after)
    # A sleep that consolidated nothing into level 1 has nothing to fold into: nothing changes.
    assert fold_dreams(lm.model, lm.tokenizer, cms, 3, PROMPTS, _cfg(steps=2), 32, None, seed=1) is None


def _dream_trained_after_consolidation():
    """A sleep that consolidated period 2 into level 1, then trained its dreams into a fresh fast expert."""
    lm, cms, _, _, _ = _fast_level_with_knowledge()
    cms.begin_period(2)
    consolidate(lm.model, lm.tokenizer, cms, 0, 1, PROMPTS, _cfg(steps=5), 32, None, seed=0,
                origin="consolidation:fast->slow@period-2", freeze=True)
    g = torch.Generator().manual_seed(11)
    slot0 = cms.unlock(0, "dream@period-2")
    with torch.no_grad():
        for bank in cms.banks(0):
            bank.A[slot0].normal_(0, 0.3, generator=g)
            bank.B[slot0].normal_(0, 0.3, generator=g)
    return lm, cms


DREAMS = [("Examples of requests:", "check my balance -> balance\nhow much is left -> balance"),
          ("Examples of requests:", "wake me at six -> alarm\nan alarm for noon -> alarm")]


def test_fold_with_dreams_carries_the_dream_text_into_the_periods_expert():
    """``dream.fold_dream_weight``: the fold also distils the dream-trained model on the dreams' own text,
    every token; the period's expert then answers that text as the dream-trained model did, far closer
    than a fold on the wake prompts alone gets it (same state, seed and steps)."""
    from model.sleep.consolidation import every_position, fold_dreams

    gaps = {}
    for weight in (0.0, 1.0):
        lm, cms = _dream_trained_after_consolidation()
        text = every_position(encode(lm.tokenizer, [p for p, _ in DREAMS], [d for _, d in DREAMS], 48))
        dreamt = _completion_logits(lm, text)
        with cms.levels_masked([0]):
            before = float(distillation_loss(dreamt, _completion_logits(lm, text), "forward_kl", 0.0))
        res = fold_dreams(lm.model, lm.tokenizer, cms, 2, PROMPTS, _cfg(steps=30), 48, None, seed=1,
                          dreams=DREAMS, dream_weight=weight)
        assert res is not None and cms.active_slots(0) == []
        gaps[weight] = (before, float(distillation_loss(dreamt, _completion_logits(lm, text), "forward_kl", 0.0)))
    assert gaps[0.0][0] == gaps[1.0][0] > 0  # the same dream-trained state before either fold
    assert gaps[1.0][1] < 0.5 * gaps[1.0][0], gaps
    assert gaps[1.0][1] < 0.5 * gaps[0.0][1], gaps


def test_fold_dream_weight_needs_a_fold():
    from model.config import DreamConfig

    with pytest.raises(ValueError, match="fold_dream_weight.*fold_into_slow"):
        DreamConfig(fold_dream_weight=1.0)
    assert DreamConfig(fold_into_slow=True, fold_dream_weight=1.0).fold_dream_weight == 1.0


def test_training_in_place_needs_an_active_slot():
    lm, cms, _, _, _ = _fast_level_with_knowledge()
    free = cms.free_slots(1)[0]
    with pytest.raises(CMSError, match=f"slot {free}.*not active"):
        consolidate(lm.model, lm.tokenizer, cms, 0, 1, PROMPTS, _cfg(steps=1), 32, None, seed=0,
                    origin="consolidation:test", into=free)


def test_copy_expert_is_exact_with_a_rank_as_large_and_keeps_the_leading_dims_with_a_smaller_one():
    from model.memory.cms import attach_cms
    from model.config import CMSConfig
    from model.decoding.loading import tiny_model

    lm = tiny_model(seed=0)
    levels = [LevelConfig(name="fast", chunk_size=1, lr=1e-2, n_experts=2, d_low=4, top_k=2),
              LevelConfig(name="slow", chunk_size=4, lr=1e-2, n_experts=3, d_low=8, top_k=3),
              LevelConfig(name="slower", chunk_size=8, lr=1e-2, n_experts=2, d_low=2, top_k=2)]
    cms = attach_cms(lm.model, CMSConfig(top_layers=2, levels=levels), seed=0)
    make_nonzero(cms, 0)
    batch = toy_batch(lm)
    with cms.levels_masked([1, 2]):
        fast_only = logits(lm, batch)
    slot = cms.unlock(1, "test")
    assert cms.copy_expert((0, 0), (1, slot))  # rank 4 into rank 8: exact
    with cms.levels_masked([0, 2], hidden={1: [0]}):  # the copy alone where the source was
        torch.testing.assert_close(logits(lm, batch), fast_only, rtol=0, atol=1e-5)
    assert cms.experts[1][slot].history[-1].startswith("copied@")
    low = cms.unlock(2, "test")
    assert not cms.copy_expert((0, 0), (2, low))  # rank 4 into rank 2: the leading dimensions
    for bs, bd in zip(cms.banks(0), cms.banks(2)):
        assert torch.equal(bd.A[low], bs.A[0][:, :2]) and torch.equal(bd.B[low], bs.B[0][:2])
    with pytest.raises(CMSError, match="not active"):
        cms.copy_expert((0, 1), (1, slot))


def test_init_copy_starts_the_new_expert_as_the_fast_one_so_the_student_starts_at_the_teacher():
    lm, cms, probe, _, _ = _fast_level_with_knowledge()
    with torch.no_grad():
        for bank in cms.banks(1):
            bank.B[0].zero_()  # the slow level adds nothing yet: the copy alone must stand in for the fast level
    teacher = _completion_logits(lm, probe)
    with cms.levels_masked([0]):
        gap_reset = float(distillation_loss(teacher, _completion_logits(lm, probe), "forward_kl", 0.0))
    res = consolidate(lm.model, lm.tokenizer, cms, 0, 1, PROMPTS, _cfg(init="copy", steps=1, lr=1e-6), 32, None,
                      seed=0, origin="consolidation:test")
    assert res.seeded_from == 0 and cms.active_slots(0) == []
    gap = float(distillation_loss(teacher, _completion_logits(lm, probe), "forward_kl", 0.0))
    assert gap < 1e-3 * gap_reset, (gap_reset, gap)  # zero init would leave the whole gap for distillation


def test_steps_zero_keeps_the_copy_alone_and_samples_nothing(monkeypatch):
    """``consolidation.steps: 0``: the new slow expert is the fast one, exactly; no teacher is sampled, no step
    taken; the fast level is freed and the new expert made read-only as after distillation."""
    import model.sleep.consolidation as consolidation

    lm, cms, probe, _, _ = _fast_level_with_knowledge()
    with torch.no_grad():
        for bank in cms.banks(1):
            bank.B[0].mul_(0.5)  # the slow level's own expert stays, smaller: the copy must not touch it
    teacher = _completion_logits(lm, probe)
    with cms.levels_masked([0]):
        gap_reset = float(distillation_loss(teacher, _completion_logits(lm, probe), "forward_kl", 0.0))
    fast = [p.detach().clone() for p in cms.level_parameters(0, [0])]
    slow_before = [p.detach().clone() for p in cms.level_parameters(1, [0])]
    monkeypatch.setattr(consolidation, "sample_continuations", lambda *a, **k: pytest.fail("teacher sampled"))
    res = consolidate(lm.model, lm.tokenizer, cms, 0, 1, PROMPTS, _cfg(init="copy", steps=0), 32, None, seed=0,
                      origin="consolidation:test", freeze=True)
    assert res.seeded_from == 0 and res.steps == [] and res.samples == []
    assert all(torch.equal(a, b) for a, b in zip(cms.level_parameters(1, [res.slot]), fast))  # the copy, untouched
    assert all(torch.equal(a, b) for a, b in zip(cms.level_parameters(1, [0]), slow_before))
    assert cms.active_slots(0) == [] and cms.experts[1][res.slot].frozen
    # the copy carries the fast level's function into the slow level (not exactly: it now reads the slow level's input)
    gap = float(distillation_loss(teacher, _completion_logits(lm, probe), "forward_kl", 0.0))
    assert gap < 0.01 * gap_reset, (gap_reset, gap)



def test_rehearsal_steps_after_the_copy_give_old_task_inputs_back_to_the_old_model(monkeypatch):
    """``rehearsal.steps`` after the copy alone: the copied expert (which answers old-task inputs as the wake's
    fast level did) learns the old model's answers on the dreamed old-task inputs; only it moves, nothing is
    sampled, and each step is recorded apart from distillation's."""
    import model.sleep.consolidation as consolidation

    monkeypatch.setattr(consolidation, "sample_continuations", lambda *a, **k: pytest.fail("teacher sampled"))
    pairs = list(zip(OLD_PROMPTS, OLD_LABELS))
    gaps, moved = {}, {}
    for n in (0, 30):
        lm, cms, _, _, _ = _fast_level_with_knowledge()
        probe = encode(lm.tokenizer, OLD_PROMPTS, OLD_LABELS, 32)
        with cms.levels_masked([0]):
            old = _completion_logits(lm, probe)  # what the old model (the fast level masked) answers
        fast = [p.detach().clone() for p in cms.level_parameters(0, [0])]
        slow_before = [p.detach().clone() for p in cms.level_parameters(1, [0])]
        cfg = _cfg(init="copy", steps=0, rehearsal={"steps": n, "batch_size": 2, "anchor_current": False})
        res = consolidate(lm.model, lm.tokenizer, cms, 0, 1, PROMPTS, cfg, 32, None, seed=0,
                          origin="consolidation:test", rehearsal=pairs, freeze=True)
        assert res.steps == [] and res.samples == [] and len(res.rehearsal_steps) == n
        assert [r.step for r in res.rehearsal_steps] == list(range(1, n + 1))
        assert all(torch.equal(a, b) for a, b in zip(cms.level_parameters(1, [0]), slow_before))  # the old expert
        assert cms.active_slots(0) == [] and cms.experts[1][res.slot].frozen
        moved[n] = not all(torch.equal(a, b) for a, b in zip(cms.level_parameters(1, [res.slot]), fast))
        gaps[n] = float(distillation_loss(old, _completion_logits(lm, probe), "forward_kl", 0.0))
    assert moved == {0: False, 30: True}
    assert gaps[30] < 0.5 * gaps[0], gaps  # the old model's answers on the old tasks, given back


def test_anchored_rehearsal_steps_keep_the_copys_answers_on_this_periods_prompts():
    """With ``rehearsal.anchor_current`` the same steps also distil the teacher's samples on this period's prompts
    (teacher: the model as the wake left it): the old tasks move toward the old model about as far, and the
    current prompts keep the copy's answers better than without the anchor."""
    pairs = list(zip(OLD_PROMPTS, OLD_LABELS))
    old_gap, new_gap = {}, {}
    for anchor in (False, True):
        lm, cms, probe, teacher, _ = _fast_level_with_knowledge()  # teacher: the wake's answers on PROMPTS
        old_probe = encode(lm.tokenizer, OLD_PROMPTS, OLD_LABELS, 32)
        with cms.levels_masked([0]):
            old = _completion_logits(lm, old_probe)
        cfg = _cfg(init="copy", steps=0, samples_per_prompt=1,
                   rehearsal={"steps": 30, "batch_size": 2, "anchor_current": anchor})
        res = consolidate(lm.model, lm.tokenizer, cms, 0, 1, PROMPTS, cfg, 32, None, seed=0,
                          origin="consolidation:test", rehearsal=pairs, freeze=True)
        assert len(res.rehearsal_steps) == 30 and res.steps == []
        assert [r["kind"] for r in res.samples] == (["teacher_data"] * len(PROMPTS) if anchor else [])
        old_gap[anchor] = float(distillation_loss(old, _completion_logits(lm, old_probe), "forward_kl", 0.0))
        new_gap[anchor] = float(distillation_loss(teacher, _completion_logits(lm, probe), "forward_kl", 0.0))
    assert new_gap[True] < 0.75 * new_gap[False], new_gap  # (0.26 against 0.46 here; the anchor is on samples)
    assert old_gap[True] < 2 * old_gap[False] + 0.05, old_gap

@pytest.mark.parametrize("row_tokens", [48, 512])  # rows of max_length (several rows), one wide row
@pytest.mark.parametrize("all_positions", [False, True])
def test_prefix_cache_places_each_pairs_rows_where_encode_packs_them(all_positions, row_tokens, monkeypatch):
    monkeypatch.setattr(consolidation_module, "DISTILLATION_ROW_TOKENS", row_tokens)
    lm, cms = tiny_with_cms()
    split = SplitForward(lm.model, cms)
    pairs = [("what is my balance ->", "balance"), ("hi ->", "greeting"), ("book a table for two please ->", "book"),
             ("x ->", "a longer label"), ("transfer money now ->", "transfer")]
    make_nonzero(cms, 0)
    views = []

    def teacher():  # the fast level masked: a view other than the default one
        views.append(1)
        return cms.levels_masked([0])

    cache = PrefixCache(split, lm.tokenizer, pairs, max_length=48, all_positions=all_positions, teacher=teacher)
    calls = []
    real = split.prefix
    split.prefix = lambda b: calls.append(b.n_examples) or real(b)
    for idx in ([0, 1, 2], [4, 2, 0, 3], [3, 1]):  # other packings, pairs seen before and new ones
        batch, state = cache.batch(idx)
        ref = encode(lm.tokenizer, [pairs[i][0] for i in idx], [pairs[i][1] for i in idx], 48, row_tokens)
        ref = every_position(ref) if all_positions else ref
        assert torch.equal(batch.input_ids, ref.input_ids) and torch.equal(batch.completion_mask, ref.completion_mask)
        real_tokens = batch.segment >= 0
        if row_tokens == 48:
            assert batch.input_ids.shape[0] > 1 or len(idx) == 2  # a batch over several packed rows
        else:  # one row, no padding
            assert batch.input_ids.shape[0] == 1 and bool(real_tokens.all())
        torch.testing.assert_close(state[real_tokens], real(ref)[real_tokens], atol=1e-5, rtol=1e-5)
        assert not state[~real_tokens].any()  # pad positions: zeros
        # what the suffix reads at the completion positions is the same as from the full prefix
        torch.testing.assert_close(split.completion_logits(state, batch), split.completion_logits(real(ref), ref),
                                   atol=1e-4, rtol=1e-4)
        with cms.levels_masked([0]):
            expected = split.completion_logits(real(ref), ref)
        torch.testing.assert_close(cache.teacher_logits(idx, batch), expected, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(split.completion_logits(real(ref), ref), expected)  # the view matters
    assert calls == [3, 2]  # each pair's prefix computed once: 0, 1, 2; then 4, 3; nothing for [3, 1]
    assert len(views) == 2  # and its teacher logits: once for [0, 1, 2], once for the new 4 and 3
    with pytest.raises(ValueError, match="no teacher"):
        PrefixCache(split, lm.tokenizer, pairs, 48).teacher_logits([0], cache.batch([0])[0])


def _with_kept_dream_expert():
    """A CMS after a sleep whose dream training was kept apart (``dream.keep_dreams``) and the next wake: the fast
    level holds period 0's read-only dream expert and period 1's writable one, both nonzero."""
    from model.sleep.dreaming import fast_parameters, keep_dreams

    lm, cms = tiny_with_cms()
    make_nonzero(cms, 1, seed=4)
    cms.reset_level(0)  # as a consolidation leaves it
    fast_parameters(cms, origin="dream@period-0")  # the dream stage unlocks its expert
    make_nonzero(cms, 0, seed=5)  # ... and trains it
    assert keep_dreams(cms, 0, top_k=2) == [0]
    cms.begin_period(1)
    assert cms.writable_slots(0) == []  # the next wake unlocks its own expert (model/memory/wake.py)
    slot = cms.unlock(0, origin="wake@period-1")
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for bank in cms.banks(0):
            bank.B[slot].normal_(0, 0.5, generator=g)
    return lm, cms, slot


def test_a_kept_dream_expert_stays_through_the_next_consolidation_and_the_student_keeps_it():
    lm, cms, wake_slot = _with_kept_dream_expert()
    info = cms.experts[0][0]
    assert info.frozen and info.period == 0 and info.origin == "dream@period-0" and cms.kept_dream_slots(0) == [0]
    kept = [p.detach().clone() for p in cms.level_parameters(0, [0])]
    batch = toy_batch(lm)
    with cms.levels_masked([], hidden={0: [wake_slot]}):
        only_kept = logits(lm, batch)
    with cms.since_sleep_masked([0]):  # what the student and the old model see: the kept expert on, the wake's off
        torch.testing.assert_close(logits(lm, batch), only_kept, rtol=0, atol=0)
    with cms.levels_masked([0]):
        assert not torch.allclose(logits(lm, batch), only_kept)  # the kept expert does change the output
    res = consolidate(lm.model, lm.tokenizer, cms, 0, 1, PROMPTS, _cfg(steps=4, init="copy"), 32, None, seed=0,
                      origin="consolidation:test", freeze=True)
    assert cms.active_slots(0) == [0] and cms.kept_dream_slots(0) == [0]  # the wake's expert freed, the dreams kept
    assert all(torch.equal(a, b) for a, b in zip(cms.level_parameters(0, [0]), kept))
    assert all(float(p.abs().sum()) == 0 for p in cms.level_parameters(0, [wake_slot]))
    assert res.seeded_from == wake_slot  # the new slow expert starts from what the wake learned, not the dreams


def test_without_kept_dreams_the_fast_level_is_masked_and_freed_whole():
    lm, cms = tiny_with_cms()
    make_nonzero(cms, 0)
    make_nonzero(cms, 1, seed=4)
    batch = toy_batch(lm)
    with cms.levels_masked([0]):
        masked = logits(lm, batch)
    with cms.since_sleep_masked([0]):
        torch.testing.assert_close(logits(lm, batch), masked, rtol=0, atol=0)
    cms.free_since_sleep(0, reason="test")
    assert cms.active_slots(0) == [] and all(float(p.detach().abs().sum()) == 0 for p in cms.level_parameters(0))
    # frozen experts of another origin (a slower level's consolidated ones) are not kept-dream experts
    cms.freeze(1, cms.active_slots(1)[0], reason="consolidated")
    assert cms.kept_dream_slots(1) == []


def test_dreams_are_kept_apart_only_while_the_wakes_expert_still_fits():
    from model.sleep.dreaming import fast_parameters, keep_dreams

    lm, cms, wake_slot = _with_kept_dream_expert()  # one kept already; top_k 2
    cms.free_since_sleep(0, reason="consolidated")
    fast_parameters(cms, origin="dream@period-1")
    assert keep_dreams(cms, 1, top_k=2) == []  # two kept would fill the top-2: the wake's expert could drop out
    assert keep_dreams(cms, 0, top_k=3) == []  # none of period 0 left unfrozen
    assert keep_dreams(cms, 1, top_k=3) == [1]
    # no free slot left for the next wake: not kept apart
    lm, cms = tiny_with_cms()
    for s in range(3):
        cms.unlock(0, origin="dream@period-0") if s else fast_parameters(cms, origin="dream@period-0")
    assert cms.free_slots(0) == [] and keep_dreams(cms, 0, top_k=5) == []
    # the dream stage trained a wake expert (no consolidation freed the level): not kept apart
    lm, cms = tiny_with_cms()
    assert cms.experts[0][0].origin == "init" and keep_dreams(cms, 0, top_k=3) == []


def _dream_trained_fast_expert(period: int = 0):
    """A CMS right after a dream stage: the consolidation freed the fast level, the dream stage unlocked and trained
    a fast expert of ``period``."""
    from model.sleep.dreaming import fast_parameters

    lm, cms = tiny_with_cms()
    cms.begin_period(period)
    cms.reset_level(0)  # as a consolidation leaves it
    fast_parameters(cms, origin=f"dream@period-{period}")
    make_nonzero(cms, 0, seed=5)
    return lm, cms


def test_dreams_kept_in_slow_move_exactly_and_free_the_fast_slot():
    from model.sleep.dreaming import keep_dreams_in_slow

    lm, cms = _dream_trained_fast_expert()
    cms.reset_level(1)  # nothing else in the slow level: the move must not change the function at all
    (src,) = cms.active_slots(0)
    batch = toy_batch(lm)
    before = logits(lm, batch)
    weights = [p.detach().clone() for p in cms.level_parameters(0, [src])]
    res = keep_dreams_in_slow(lm.model, lm.tokenizer, cms, 0, PROMPTS, 32, merge_steps=2, lr=1e-2, seed=0)
    assert res is not None and res.src == src and res.exact and res.merged is None
    assert cms.active_slots(0) == [] and all(float(p.detach().abs().sum()) == 0 for p in cms.level_parameters(0))
    info = cms.experts[1][res.slot]
    assert info.frozen and info.period == 0 and info.origin == "dream@period-0:fast->slow"
    assert res.slot in cms.frozen_slots(1) and res.slot not in cms.writable_slots(1)  # the wake's step spares it
    assert all(torch.equal(a, b) for a, b in zip(cms.level_parameters(1, [res.slot]), weights))
    torch.testing.assert_close(logits(lm, batch), before, rtol=1e-5, atol=1e-5)


def test_dreams_kept_in_a_full_slow_level_merge_its_oldest_first_or_stay():
    from model.sleep.dreaming import keep_dreams_in_slow

    lm, cms = _dream_trained_fast_expert(period=2)
    while cms.free_slots(1):  # a full slow level: its initial expert and two consolidated ones
        cms.freeze(1, cms.unlock(1, origin="consolidation:test"), reason="consolidated")
    make_nonzero(cms, 1, seed=4)
    (src,) = cms.active_slots(0)
    res = keep_dreams_in_slow(lm.model, lm.tokenizer, cms, 2, PROMPTS, 32, merge_steps=2, lr=1e-2, seed=0,
                              merge_when_full=False)
    assert res is None and cms.active_slots(0) == [src]  # may not merge: nothing moved
    res = keep_dreams_in_slow(lm.model, lm.tokenizer, cms, 2, PROMPTS, 32, merge_steps=2, lr=1e-2, seed=0)
    assert res is not None and res.merged is not None and res.slot == res.merged.freed
    assert (res.merged.into, res.merged.freed) == (1, 2)  # the two oldest read-only experts, not the writable one
    assert len(cms.active_slots(1)) == 3 and cms.experts[1][res.slot].period == 2 and cms.active_slots(0) == []


def _full_slow_level_one_expert_per_period(period: int, slow_periods: tuple[int, int] | None = None):
    """A dream-trained fast expert of ``period`` and a full slow level (3 slots): the initial expert and the
    consolidated experts of ``slow_periods`` (default period - 1 and period), read-only and nonzero."""
    lm, cms = _dream_trained_fast_expert(period=period)
    for p in slow_periods or (period - 1, period):
        slot = cms.unlock(1, origin=f"consolidation:{p}")
        cms.experts[1][slot].period = p
        cms.freeze(1, slot, reason="consolidated")
    make_nonzero(cms, 1, seed=4)
    return lm, cms


def test_a_dream_kept_in_a_full_slow_level_joins_its_own_period_with_absorb():
    """keep_dreams_when_full absorb: the only merge would join periods 1 and 2, so the dream expert is fitted into
    period 2's consolidated expert, the fast slot is freed, and period 1's expert is left as it was; merge (the
    default) merges periods 1 and 2 to make room."""
    from model.sleep.dreaming import keep_dreams_in_slow

    lm, cms = _full_slow_level_one_expert_per_period(2)
    (src,) = cms.active_slots(0)
    period_1 = [p.detach().clone() for p in cms.level_parameters(1, [1])]
    res = keep_dreams_in_slow(lm.model, lm.tokenizer, cms, 2, PROMPTS, 32, merge_steps=2, lr=1e-2, seed=0,
                              merge_policy="same_period", when_full="absorb")
    assert res is not None and res.merged is None and res.absorbed is not None and not res.exact
    assert res.slot == res.absorbed.into == 2 and res.absorbed.src == (0, src)
    assert cms.active_slots(0) == [] and cms.active_slots(1) == [0, 1, 2]
    assert [(e.period, e.origin) for e in cms.experts[1][1:]] == [(1, "consolidation:1"), (2, "consolidation:2")]
    assert all(torch.equal(a, b) for a, b in zip(cms.level_parameters(1, [1]), period_1))

    lm, cms = _full_slow_level_one_expert_per_period(2)
    res = keep_dreams_in_slow(lm.model, lm.tokenizer, cms, 2, PROMPTS, 32, merge_steps=2, lr=1e-2, seed=0,
                              merge_policy="same_period")
    assert res.absorbed is None and (res.merged.into, res.merged.freed) == (1, 2)  # two periods joined
    assert cms.experts[1][1].period == 1 and cms.experts[1][2].period == 2 and cms.experts[1][2].origin.startswith("dream")


def test_absorb_merges_as_before_when_the_pair_is_one_periods_or_the_period_has_no_expert():
    from model.sleep.dreaming import keep_dreams_in_slow

    lm, cms = _dream_trained_fast_expert(period=3)  # slots 1 and 2 both hold period 1: a same-period pair
    for origin in ("consolidation:1", "dream@period-1:fast->slow"):
        slot = cms.unlock(1, origin=origin)
        cms.experts[1][slot].period = 1
        cms.freeze(1, slot, reason="test")
    make_nonzero(cms, 1, seed=4)
    res = keep_dreams_in_slow(lm.model, lm.tokenizer, cms, 3, PROMPTS, 32, merge_steps=2, lr=1e-2, seed=0,
                              merge_policy="same_period", when_full="absorb")
    assert res.absorbed is None and (res.merged.into, res.merged.freed) == (1, 2) and res.slot == 2
    # period 5 has no consolidated slow expert to join: the merge makes room as before
    lm, cms = _full_slow_level_one_expert_per_period(5, slow_periods=(1, 2))
    res = keep_dreams_in_slow(lm.model, lm.tokenizer, cms, 5, PROMPTS, 32, merge_steps=2, lr=1e-2, seed=0,
                              merge_policy="same_period", when_full="absorb")
    assert res.absorbed is None and (res.merged.into, res.merged.freed) == (1, 2) and cms.experts[1][2].period == 5
    with pytest.raises(ValueError, match="unknown when_full"):
        keep_dreams_in_slow(lm.model, lm.tokenizer, cms, 5, PROMPTS, 32, merge_steps=2, lr=1e-2, seed=0,
                            when_full="fold")


def test_only_an_expert_the_dream_stage_unlocked_moves_to_the_slow_level():
    from model.sleep.dreaming import keep_dreams_in_slow

    lm, cms = tiny_with_cms()  # the fast level still holds the wake's expert: the dreams trained it
    make_nonzero(cms, 0)
    before = [p.detach().clone() for p in cms.level_parameters(1)]
    assert keep_dreams_in_slow(lm.model, lm.tokenizer, cms, 0, PROMPTS, 32, merge_steps=2, lr=1e-2, seed=0) is None
    assert cms.experts[0][0].origin == "init" and all(torch.equal(a, b) for a, b in zip(cms.level_parameters(1), before))
    lm, cms = _dream_trained_fast_expert(period=1)  # another period's dream expert is not this sleep's
    assert keep_dreams_in_slow(lm.model, lm.tokenizer, cms, 0, PROMPTS, 32, merge_steps=2, lr=1e-2, seed=0) is None
