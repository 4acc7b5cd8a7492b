"""Capacity: merging the two oldest experts of a full level (model/memory/merging.py)."""

from __future__ import annotations

import pytest
import torch

from model.config import ConsolidationConfig
from model.memory.cms import CMSError
from model.memory.merging import gated_expert_output, level_inputs, merge_oldest, oldest_pair
from model.memory.wake import ensure_writable
from model.sleep.consolidation import consolidate
from tests.model.helpers import make_nonzero, tiny_with_cms

PROMPTS = ["what is my balance -> ", "book a table for two -> ", "set an alarm for seven -> "]


def test_merge_fits_the_gated_sum_of_both_experts_and_frees_one_slot():
    lm, cms = tiny_with_cms()
    cms.unlock(1, "consolidation:a")
    cms.unlock(1, "consolidation:b")
    make_nonzero(cms, 1, seed=2)
    assert oldest_pair(cms, 1) == (1, 2)
    inputs = level_inputs(lm.model, lm.tokenizer, cms, 1, PROMPTS, 32)
    targets = [gated_expert_output(b, h, [1, 2]).detach() for b, h in zip(cms.banks(1), inputs)]
    alone = [float((gated_expert_output(b, h, [1]) - t).norm() / t.norm()) for b, h, t in zip(cms.banks(1), inputs, targets)]
    rec = merge_oldest(lm.model, lm.tokenizer, cms, 1, PROMPTS, 32, steps=200, lr=1e-2, seed=0)
    assert (rec.into, rec.freed) == (1, 2) and cms.free_slots(1) == [2]
    assert all(float(p.abs().sum()) == 0 for p in cms.level_parameters(1, [2]))
    for e, a in zip(rec.relative_error, alone):  # the merged expert is closer to the pair than either one was
        assert e < 0.5 * a, (rec.relative_error, alone)


def test_merge_needs_two_experts():
    lm, cms = tiny_with_cms()
    with pytest.raises(CMSError, match="merging needs two active experts"):
        merge_oldest(lm.model, lm.tokenizer, cms, 1, PROMPTS, 32, steps=2, lr=1e-2, seed=0)


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
