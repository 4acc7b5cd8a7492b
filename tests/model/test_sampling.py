"""The sampler: greedy equals Hugging Face generate; seeded sampling is reproducible."""

from __future__ import annotations

import pytest
import torch

from model.sampling import pick_tokens, sample_continuations
from tests.model.helpers import make_nonzero, tiny_with_cms

PROMPTS = ["what is my balance ->", "book a table for two please ->", "hi"]


def test_greedy_equals_hf_generate_with_cms_and_left_padding():
    lm, cms = tiny_with_cms()
    make_nonzero(cms, 0)
    got = sample_continuations(lm.model, lm.tokenizer, PROMPTS, 1, 10, temperature=0.0, batch_size=3)
    for prompt, sample in zip(PROMPTS, got):
        enc = lm.tokenizer(prompt, return_tensors="pt")
        ref = lm.model.generate(**enc, max_new_tokens=10, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id,
                                eos_token_id=lm.tokenizer.eos_token_id)
        new = ref[0, enc["input_ids"].shape[1]:].tolist()
        eos = lm.tokenizer.eos_token_id
        new = new[: new.index(eos)] if eos in new else new
        assert sample.text == lm.tokenizer.decode(new, skip_special_tokens=True)


def test_seeded_sampling_is_reproducible_and_leaves_global_rng_alone():
    lm, _ = tiny_with_cms()
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = sample_continuations(lm.model, lm.tokenizer, PROMPTS, 2, 8, temperature=1.0, top_p=0.9, seed=5)
    after = torch.rand(1)
    b = sample_continuations(lm.model, lm.tokenizer, PROMPTS, 2, 8, temperature=1.0, top_p=0.9, seed=5)
    c = sample_continuations(lm.model, lm.tokenizer, PROMPTS, 2, 8, temperature=1.0, top_p=0.9, seed=6)
    assert [s.text for s in a] == [s.text for s in b] != [s.text for s in c]
    assert torch.equal(before, after)
    assert [s.prompt for s in a] == [p for p in PROMPTS for _ in range(2)]


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    picks = {int(pick_tokens(logits, 1.0, 0.7, g)) for _ in range(200)}
    assert picks == {0, 1}  # 0.5 + 0.3 covers 0.7; the tail is never drawn
    assert int(pick_tokens(logits, 0.0, 1.0, g)) == 0


def test_bad_arguments():
    lm, _ = tiny_with_cms()
    with pytest.raises(ValueError, match="no prompts"):
        sample_continuations(lm.model, lm.tokenizer, [], 1, 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        sample_continuations(lm.model, lm.tokenizer, ["x"], 1, 0)


def test_min_new_tokens_forbids_early_eos():
    lm, cms = tiny_with_cms()
    eos = lm.tokenizer.eos_token_id
    def eos_first(module, inputs, out):  # make EOS the overwhelming choice at every step
        out[..., eos] += 100.0
        return out

    lm.model.get_output_embeddings().register_forward_hook(eos_first)
    early = sample_continuations(lm.model, lm.tokenizer, PROMPTS, 1, 12, temperature=0.0)
    assert all(s.finished and s.text == "" for s in early)
    late = sample_continuations(lm.model, lm.tokenizer, PROMPTS, 1, 12, temperature=0.0, min_new_tokens=5)
    for s in late:
        assert len(lm.tokenizer(s.text, add_special_tokens=False)["input_ids"]) >= 5
