"""Rehearsal inside sleep: dreamed inputs of earlier tasks from their label names (model/sleep/rehearsal.py)."""

from __future__ import annotations

import pytest

from model.config import RehearsalConfig
from model.sleep.rehearsal import RehearsalError, check_rehearsal_dreams, dream_task_inputs, rehearsal_prompt
from tests.model.helpers import make_nonzero, tiny_with_cms


def test_checks_reject_short_repeated_and_label_only_dreams():
    cfg = RehearsalConfig(min_chars=8, near_duplicate_threshold=90)
    texts = ["how do I change my pin", "how do I change my pin", "pin change", "hi", "what is my pin again"]
    labels = ["pin_change", "pin_change", "pin_change", "pin_change", "balance"]
    assert check_rehearsal_dreams(texts, labels, cfg) == [
        (), ("near_duplicate",), ("label_only",), ("too_short",), ()]
    # The same text under another label is no duplicate: duplicates are counted per label.
    assert check_rehearsal_dreams(["turn on the lights", "turn on the lights"], ["a", "b"], cfg) == [(), ()]
    with pytest.raises(ValueError, match="2 dreams but 1 labels"):
        check_rehearsal_dreams(["a", "b"], ["x"], cfg)


def test_dreams_come_from_label_names_with_the_fast_level_masked():
    lm, cms = tiny_with_cms()
    make_nonzero(cms, 0)
    cfg = RehearsalConfig(per_label=3, max_new_tokens=6, min_chars=1, chat=False)
    dreams = dream_task_inputs(lm.model, lm.tokenizer, cms, {0: ["pin_change", "balance"], 1: ["alarm"]}, [0], cfg,
                               seed=0)
    assert [(d.task, d.label) for d in dreams] == [(0, "pin_change")] * 3 + [(0, "balance")] * 3 + [(1, "alarm")] * 3
    assert all(d.passed == (not d.failed) for d in dreams)
    again = dream_task_inputs(lm.model, lm.tokenizer, cms, {0: ["pin_change", "balance"], 1: ["alarm"]}, [0], cfg,
                              seed=0)
    assert [d.text for d in again] == [d.text for d in dreams]  # seeded
    assert cms.active_slots(0) == [0] and cms.blocks[str(cms.layer_ids[0])].enabled == [True, True]  # views undone
    prompt, completion = dreams[0].pair("{text} -> {label}")
    assert prompt == f"{dreams[0].text} -> " and completion == "pin change"
    assert "pin change" in rehearsal_prompt(lm.tokenizer, "pin_change", cfg)


def test_a_task_without_label_names_is_a_clear_error():
    lm, cms = tiny_with_cms()
    with pytest.raises(RehearsalError, match=r"task\(s\) \[1\] have no label names"):
        dream_task_inputs(lm.model, lm.tokenizer, cms, {0: ["a"], 1: []}, [0], RehearsalConfig(), seed=0)
    with pytest.raises(ValueError, match="must contain {label}"):
        RehearsalConfig(prompt="Write something.")
