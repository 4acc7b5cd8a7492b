"""Capacity: merging two experts of a full level (model/memory/merging.py)."""

from __future__ import annotations

import pytest
import torch

from model.config import ConsolidationConfig, LevelConfig
from model.memory.cms import CMSError, ExpertBank
from model.memory.merging import (absorb_into, fit_sum, gated_expert_output, joins_periods, level_inputs,
                                  merge_pair, pair_to_merge)
from model.memory.wake import ensure_writable
from model.sleep.consolidation import consolidate
from tests.model.helpers import make_nonzero, tiny_cms_config, tiny_with_cms

PROMPTS = ["what is my balance -> ", "book a table for two -> ", "set an alarm for seven -> "]


def test_merge_fits_the_gated_sum_of_both_experts_and_frees_one_slot():
    lm, cms = tiny_with_cms()
    cms.unlock(1, "consolidation:a")
    cms.unlock(1, "consolidation:b")
    make_nonzero(cms, 1, seed=2)
    assert pair_to_merge(cms, 1) == (1, 2)
    inputs = level_inputs(lm.model, lm.tokenizer, cms, 1, PROMPTS, 32)
    targets = [gated_expert_output(b, h, [1, 2]).detach() for b, h in zip(cms.banks(1), inputs)]
    alone = [float((gated_expert_output(b, h, [1]) - t).norm() / t.norm()) for b, h, t in zip(cms.banks(1), inputs, targets)]
    rec = merge_pair(lm.model, lm.tokenizer, cms, 1, PROMPTS, 32, steps=200, lr=1e-2, seed=0)
    assert (rec.into, rec.freed) == (1, 2) and cms.free_slots(1) == [2]
    assert all(float(p.abs().sum()) == 0 for p in cms.level_parameters(1, [2]))
    for e, a in zip(rec.relative_error, alone):  # the merged expert is closer to the pair than either one was
        assert e < 0.5 * a, (rec.relative_error, alone)


def _slow_level_with_a_kept_dream():
    """A slow level of 4 slots: the initial expert, period 0's and period 1's consolidated experts and period 1's
    kept dream expert (slots 1, 2, 3), all read-only and nonzero."""
    lm, cms = tiny_with_cms(cfg=tiny_cms_config(n_experts=4))
    for origin, period in (("consolidation:0", 0), ("consolidation:1", 1), ("dream:period-1:fast->slow", 1)):
        slot = cms.unlock(1, origin)
        cms.experts[1][slot].period = period
        cms.freeze(1, slot, reason="test")
    make_nonzero(cms, 1, seed=3)
    return lm, cms


def test_same_period_policy_merges_a_periods_two_experts_and_keeps_its_period():
    """A slow level with period 0's and period 1's consolidated experts and period 1's kept dream expert: the
    oldest policy merges periods 0 and 1 (period 0's inputs then meet period 1's function); same_period merges
    period 1's two, and every input keeps the experts' periods it had."""
    lm, cms = _slow_level_with_a_kept_dream()
    assert pair_to_merge(cms, 1) == pair_to_merge(cms, 1, "oldest") == (1, 2)
    assert pair_to_merge(cms, 1, "same_period") == (2, 3)
    rec = merge_pair(lm.model, lm.tokenizer, cms, 1, PROMPTS, 32, steps=2, lr=1e-2, seed=0, policy="same_period")
    assert (rec.into, rec.freed) == (2, 3) and cms.free_slots(1) == [3]
    assert [(e.slot, e.period, e.frozen) for e in cms.experts[1] if e.active and e.slot] == [(1, 0, True), (2, 1, True)]
    # no period holds two experts: the two oldest, as the oldest policy
    assert pair_to_merge(cms, 1, "same_period") == (1, 2)
    with pytest.raises(ValueError, match="unknown merge policy"):
        pair_to_merge(cms, 1, "newest")


@pytest.mark.parametrize(("policy", "pair"), [("oldest", (1, 2)), ("same_period", (2, 3))])
def test_a_full_level_merges_the_pair_consolidation_merge_pair_names(policy, pair):
    lm, cms = _slow_level_with_a_kept_dream()
    ensure_writable(cms, cms.cfg.levels, origin="wake:2")
    make_nonzero(cms, 0, seed=4)
    cfg = ConsolidationConfig(steps=1, batch_size=2, alpha=1.0, gamma=0.0, max_new_tokens=2, merge_steps=2,
                              on_policy_fraction=0.0, merge_pair=policy)
    res = consolidate(lm.model, lm.tokenizer, cms, 0, 1, PROMPTS, cfg, 32, None, seed=0, origin="consolidation:2",
                      freeze=True)
    assert (res.merged.into, res.merged.freed) == pair and res.slot == pair[1]


def test_absorb_fits_a_faster_levels_expert_into_a_slow_one_and_frees_it():
    """A merge across levels: the slow expert afterwards approximates its own gated output plus the fast expert's, on
    the slow level's inputs; the fast slot is freed; the slow expert keeps its slot, period, origin and flag."""
    lm, cms = _slow_level_with_a_kept_dream()
    ensure_writable(cms, cms.cfg.levels, origin="dream@period-1")
    make_nonzero(cms, 0, seed=6)
    (src,) = cms.active_slots(0)
    with cms.levels_masked([0]):
        inputs = level_inputs(lm.model, lm.tokenizer, cms, 1, PROMPTS, 32)
    targets = [(gated_expert_output(b, h, [2]) + gated_expert_output(f, h, [src])).detach()
               for b, f, h in zip(cms.banks(1), cms.banks(0), inputs)]
    alone = [float((gated_expert_output(b, h, [2]) - t).norm() / t.norm()) for b, h, t in zip(cms.banks(1), inputs, targets)]
    others = [p.detach().clone() for p in cms.level_parameters(1, [1, 3])]
    with cms.levels_masked([0]):
        rec = absorb_into(lm.model, lm.tokenizer, cms, (0, src), 1, 2, PROMPTS, 32, steps=200, lr=1e-2, seed=0)
    assert rec.src == (0, src) and (rec.level, rec.into) == (1, 2)
    assert cms.active_slots(0) == [] and all(float(p.abs().sum()) == 0 for p in cms.level_parameters(0))
    for e, a in zip(rec.relative_error, alone):  # the slow expert now carries the fast one's function too
        assert e < 0.5 * a, (rec.relative_error, alone)
    assert all(torch.equal(a, b) for a, b in zip(cms.level_parameters(1, [1, 3]), others))  # no other expert moves
    info = cms.experts[1][2]
    assert (info.period, info.frozen, info.origin) == (1, True, "consolidation:1") and cms.free_slots(1) == []
    assert info.history[-1].startswith("absorbed@")


def test_absorb_starts_from_the_larger_contribution_where_the_slow_expert_cannot_move():
    """In a layer where the slow expert gives nothing and gets no gradient (there: A = B = 0; in the top layer of the
    embedded model: a router saturated off on every input), the fit starts from the fast expert and so takes its
    function in; where the slow expert's output is the larger, the fit starts from it, as before."""
    lm, cms = _slow_level_with_a_kept_dream()
    ensure_writable(cms, cms.cfg.levels, origin="dream@period-1")
    make_nonzero(cms, 0, seed=6)
    (src,) = cms.active_slots(0)
    dead = cms.banks(1)[0]
    with torch.no_grad():
        dead.A[2].zero_()
        dead.B[2].zero_()
        for bank in cms.banks(0)[1:]:  # elsewhere the fast expert is the smaller one
            bank.B[src].mul_(1e-3)
    with cms.levels_masked([0]):
        rec = absorb_into(lm.model, lm.tokenizer, cms, (0, src), 1, 2, PROMPTS, 32, steps=5, lr=1e-3, seed=0)
    assert rec.started_from == ["src"] + ["into"] * (len(cms.banks(1)) - 1)
    assert rec.relative_error[0] < 0.5, rec.relative_error  # without the start: 1.0, nothing can move


def test_merge_starts_from_the_larger_contribution_where_the_kept_expert_cannot_move():
    """merge_pair, as absorb_into: in a layer where the expert that keeps the slot gives nothing and gets no gradient
    (there: A = B = 0; in a merge of the embedded model: a router saturated off on every input, which left the top
    layer at relative error 1.0, the younger expert's function dropped), the fit starts from the other expert;
    elsewhere from the larger of the two."""
    lm, cms = _slow_level_with_a_kept_dream()
    dead = cms.banks(1)[0]
    with torch.no_grad():
        dead.A[2].zero_()
        dead.B[2].zero_()
        for bank in cms.banks(1)[1:]:  # elsewhere the younger expert is the smaller one
            bank.B[3].mul_(1e-3)
    rec = merge_pair(lm.model, lm.tokenizer, cms, 1, PROMPTS, 32, steps=5, lr=1e-3, seed=0, policy="same_period")
    assert (rec.into, rec.freed) == (2, 3)
    assert rec.started_from == ["freed"] + ["into"] * (len(cms.banks(1)) - 1)
    assert rec.relative_error[0] < 0.5, rec.relative_error  # without the start: 1.0, nothing can move


def _half_gated_pair(own_scale: float) -> tuple[ExpertBank, torch.Tensor]:
    """A one-layer bank of two experts over inputs h (256, 16) in two clusters, +3u and -3u: expert 0's router is
    50u, saturated on for one cluster and off (no gradient) for the other; expert 1 is gated on half everywhere.
    ``own_scale`` scales expert 0's output."""
    g = torch.Generator().manual_seed(1)
    d = 16
    bank = ExpertBank(d, LevelConfig(name="slow", chunk_size=1, n_experts=2, d_low=4, lr=1e-3), "silu")
    u = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
    sign = torch.where(torch.arange(256) % 2 == 0, 1.0, -1.0)
    h = sign[:, None] * 3 * u + torch.randn(256, d, generator=g)
    with torch.no_grad():
        bank.A[0].copy_(torch.randn(d, 4, generator=g))
        bank.B[0].copy_(own_scale * torch.randn(4, d, generator=g))
        bank.router[0].copy_(50 * u)
        bank.A[1].copy_(0.3 * torch.randn(d, 4, generator=g))
        bank.B[1].copy_(0.3 * torch.randn(4, d, generator=g))
    return bank, h


def _fit(bank: ExpertBank, h: torch.Tensor, start: str, gen: torch.Generator):
    with torch.no_grad():
        own, other = gated_expert_output(bank, h, [0]), gated_expert_output(bank, h, [1])
    return fit_sum(bank, 0, own, bank, 1, other, h, steps=200, lr=1e-2, gen=gen, start=start)


def _relative(bank: ExpertBank, h: torch.Tensor, target: torch.Tensor) -> float:
    with torch.no_grad():
        return float((gated_expert_output(bank, h, [0]) - target).norm() / target.norm())


def test_both_starts_keeps_the_smaller_start_where_the_larger_one_is_gated_off_for_half_the_inputs():
    """consolidation.merge_start both: expert 0 gives the larger output, but its router is saturated off on half the
    inputs, where its fit cannot turn it on; started from expert 1 (on everywhere) the fit ends far closer to the sum,
    and both keeps that fit, its weights in the slot, the larger start's error beside it."""
    bank, h = _half_gated_pair(own_scale=0.05)
    with torch.no_grad():
        own, other = gated_expert_output(bank, h, [0]), gated_expert_output(bank, h, [1])
    assert own.norm() > other.norm()
    target = own + other
    larger_bank, _ = _half_gated_pair(own_scale=0.05)
    larger = _fit(larger_bank, h, "larger", torch.Generator().manual_seed(0))
    both = _fit(bank, h, "both", torch.Generator().manual_seed(0))
    assert not larger.from_other and larger.other_start_error is None
    assert both.from_other and both.error < 0.75 * larger.error, (larger, both)
    assert both.other_start_error == pytest.approx(larger.error, abs=1e-6)  # the same steps on the same minibatches
    assert _relative(bank, h, target) == pytest.approx(both.error, abs=1e-6)
    assert _relative(larger_bank, h, target) == pytest.approx(larger.error, abs=1e-6)


def test_both_starts_ends_as_the_larger_start_where_that_one_wins():
    """Where the larger start's fit is the better, both leaves exactly the larger start's weights and advances the
    generator as the larger start alone does (so what follows a merge does not change)."""
    results = {}
    for start in ("larger", "both"):
        bank, h = _half_gated_pair(own_scale=1.0)
        gen = torch.Generator().manual_seed(0)
        fit = _fit(bank, h, start, gen)
        results[start] = (fit, [p.detach().clone() for p in (bank.A[0], bank.B[0], bank.router[0])],
                          torch.randperm(1000, generator=gen))
    (larger, w_larger, next_larger), (both, w_both, next_both) = results["larger"], results["both"]
    assert not both.from_other and both.error == larger.error and both.other_start_error > both.error
    assert all(torch.equal(a, b) for a, b in zip(w_larger, w_both))
    assert torch.equal(next_larger, next_both)
    with pytest.raises(ValueError, match="unknown merge start"):
        _fit(bank, h, "smaller", gen)


def test_merge_pair_with_both_starts_is_never_worse_in_any_layer():
    """merge_pair, start both, on the tiny model: every layer records the losing start's error, and ends at or below
    the layer's error with the larger start."""
    errors = {}
    for start in ("larger", "both"):
        lm, cms = _slow_level_with_a_kept_dream()
        rec = merge_pair(lm.model, lm.tokenizer, cms, 1, PROMPTS, 32, steps=20, lr=1e-2, seed=0,
                         policy="same_period", start=start)
        errors[start] = rec
    larger, both = errors["larger"], errors["both"]
    assert larger.other_start_error == [None] * len(larger.relative_error)
    assert all(e is not None for e in both.other_start_error)
    for a, b, alt in zip(larger.relative_error, both.relative_error, both.other_start_error):
        assert b <= a + 1e-6 and b <= alt + 1e-6, (larger, both)


def test_absorb_refuses_one_level_and_inactive_slots():
    lm, cms = _slow_level_with_a_kept_dream()
    with pytest.raises(CMSError, match="use merge_pair within a level"):
        absorb_into(lm.model, lm.tokenizer, cms, (1, 3), 1, 2, PROMPTS, 32, steps=1, lr=1e-2, seed=0)
    cms.reset_level(0)
    with pytest.raises(CMSError, match="level 0 slot 0 is not active"):
        absorb_into(lm.model, lm.tokenizer, cms, (0, 0), 1, 2, PROMPTS, 32, steps=1, lr=1e-2, seed=0)


def test_joins_periods_says_whether_a_pair_holds_two_periods():
    lm, cms = _slow_level_with_a_kept_dream()  # slots 0, 1, 2, 3: periods 0, 0, 1, 1
    assert joins_periods(cms, 1, (1, 2)) and not joins_periods(cms, 1, (2, 3)) and not joins_periods(cms, 1, (0, 1))
    cms.experts[1][0].period = None  # an expert without a period is a period of its own
    assert joins_periods(cms, 1, (0, 1))


def test_merge_needs_two_experts():
    lm, cms = tiny_with_cms()
    with pytest.raises(CMSError, match="merging needs two active experts"):
        merge_pair(lm.model, lm.tokenizer, cms, 1, PROMPTS, 32, steps=2, lr=1e-2, seed=0)


def test_thirty_sleeps_never_run_out_of_capacity():
    """A nightly run: 30 wake/sleep cycles on a slow level of 3 slots; every sleep consolidates."""
    lm, cms = tiny_with_cms()
    cfg = ConsolidationConfig(steps=1, batch_size=2, alpha=1.0, gamma=0.0, max_new_tokens=2, merge_steps=2,
                              on_policy_fraction=0.0)
    merges = 0
    for night in range(30):
        ensure_writable(cms, cms.cfg.levels, origin=f"wake:{night}")
        make_nonzero(cms, 0, seed=night)
        res = consolidate(lm.model, lm.tokenizer, cms, 0, 1, PROMPTS, cfg, 32, None, seed=night,
                          origin=f"consolidation:{night}", freeze=True)
        merges += res.merged is not None
        assert cms.active_slots(0) == [] and res.slot in cms.active_slots(1)
        assert all(torch.isfinite(p).all() for p in cms.level_parameters(1))
    assert merges >= 27  # 3 slots: the first sleeps fill them, every later one merges first
    assert len(cms.active_slots(1)) == 3


def test_a_fit_that_the_steps_make_worse_keeps_its_start():
    """fit_expert never ends worse than it started: with a step size that throws the expert off (as Adam's first
    steps on a router did in the embedded model's top layer, where inputs are huge), the starting weights stay."""
    from model.memory.merging import fit_expert

    lm, cms = _slow_level_with_a_kept_dream()
    bank = cms.banks(1)[0]
    (h,) = level_inputs(lm.model, lm.tokenizer, cms, 1, PROMPTS, 32)[:1]
    target = gated_expert_output(bank, h, [2, 3]).detach()
    start = [p.detach().clone() for p in (bank.A[2], bank.B[2], bank.router[2])]
    start_error = float((gated_expert_output(bank, h, [2]) - target).norm() / target.norm())
    error, kept = fit_expert(bank, 2, h, target, steps=3, lr=1e3, gen=torch.Generator().manual_seed(0))
    assert kept and error == pytest.approx(start_error, rel=1e-6)
    assert all(torch.equal(p, s) for p, s in zip((bank.A[2], bank.B[2], bank.router[2]), start))
    good, kept = fit_expert(bank, 2, h, target, steps=200, lr=1e-2, gen=torch.Generator().manual_seed(0))
    assert not kept and good < 0.5 * start_error  # a fit that helps is kept
