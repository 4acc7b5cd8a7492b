"""bench/long_context_recall.py: recall after LoRA reading, in the question and the cloze form, on the tiny model."""

from __future__ import annotations

import pytest
import torch

from bench.long_context_recall import cloze_prompt, run
from model.decoding.loading import tiny_model
from model.evaluation.baselines import attach_lora
from model.evaluation.long_context import build_document, needle_items

PROSE = [f"The weather in a town far away was fine on day {i}." for i in range(60)]


def test_cloze_prompt_is_the_facts_words_up_to_the_value():
    assert cloze_prompt("What is the secret number of the red fox?") == "The secret number of the red fox is"
    with pytest.raises(ValueError, match="not a needle question"):
        cloze_prompt("Where is Mary?")


def test_rows_per_reading_and_a_reading_that_changes_nothing_recalls_as_no_memory():
    lm = tiny_model(seed=1)
    lora = attach_lora(lm.model, 4, 8.0, ["q_proj", "v_proj"], seed=0)
    before = [x.detach().clone() for x in lora]
    docs = [build_document(lm.tokenizer, it, PROSE, 300, seed=0) for it in needle_items(4, 3, 7)]
    rows = run(lm.model, lm.tokenizer, lora, docs, epochs=[1, 2], lrs=[0.0, 0.05], window=128, grad_clip=1.0)
    assert [(r["reading"], r.get("lr"), r.get("epochs")) for r in rows] == [
        ("no_memory", None, None), ("facts_only", None, None),
        ("lora", 0.0, 1), ("lora", 0.0, 2), ("lora", 0.05, 1), ("lora", 0.05, 2)]
    for r in rows:
        assert all(k in r and r[k] in {0.0, 0.25, 0.5, 0.75, 1.0} for k in ("question", "cloze"))
    lora_rows = [r for r in rows if r["reading"] == "lora"]
    pieces = lora_rows[0]["steps_per_document"]
    assert pieces >= 2 and [r["steps_per_document"] for r in lora_rows] == [pieces, 2 * pieces, pieces, 2 * pieces]
    for r in lora_rows[:2]:  # lr 0 trains nothing: the answers are those with no memory
        assert (r["question"], r["cloze"]) == (rows[0]["question"], rows[0]["cloze"])
    assert all(torch.equal(x, b) for x, b in zip(lora, before))  # the fresh adapters are back
