"""Wake training and label log-likelihood scoring on a tiny model."""

from __future__ import annotations

import pytest
import torch

from model.memory.optimizer import ChunkedOptimizer
from model.memory.wake import (
    NonFiniteLossError,
    best_labels,
    completion_logprobs,
    encode,
    label_scores,
    split_template,
    train_period,
)
from tests.model.helpers import make_nonzero, tiny_cms_config, tiny_with_cms

TEMPLATE = "{text} -> {label}"
TOY = [
    ("what is my balance", "balance"),
    ("how much money do i have", "balance"),
    ("book a table for two", "restaurant_reservation"),
    ("reserve a table tonight", "restaurant_reservation"),
    ("wake me up at seven", "alarm"),
    ("set an alarm for six", "alarm"),
]


def test_split_template_and_encode_boundary():
    lm, _ = tiny_with_cms()
    prompt, comp = split_template(TEMPLATE, "book a table", "restaurant_reservation")
    assert (prompt, comp) == ("book a table -> ", "restaurant reservation")
    b = encode(lm.tokenizer, [prompt, "x -> "], [comp, "alarm"], 64)
    assert b.input_ids.shape[0] == 1  # both fit in one packed row
    for k, (p, c) in enumerate([(prompt, comp), ("x -> ", "alarm")]):
        mine = b.segment == k
        ids = b.input_ids[mine & b.completion_mask].tolist()
        assert ids[-1] == lm.tokenizer.eos_token_id
        assert lm.tokenizer.decode(ids[:-1]) == c
        assert lm.tokenizer.decode(b.input_ids[mine & ~b.completion_mask]) == p
        assert b.position_ids[mine].tolist() == list(range(int(mine.sum())))
    assert b.n_tokens == int((b.segment >= 0).sum()) and b.n_examples == 2


def test_packing_fills_rows_first_fit():
    lm, _ = tiny_with_cms()
    prompts = ["what is my balance -> "] * 9
    b = encode(lm.tokenizer, prompts, ["balance"] * 9, 32)
    n = b.n_tokens // 9  # tokens per example
    per_row = 32 // n
    assert b.input_ids.shape[0] == -(-9 // per_row) and b.input_ids.shape[1] == per_row * n
    assert sorted(set(b.segment[b.segment >= 0].tolist())) == list(range(9))


def test_a_wider_row_packs_the_same_examples_with_less_padding():
    """row_length: rows longer than max_length hold more examples; each example's tokens, positions and completion
    mask are the ones it has in rows of max_length, and the prompt is still cut at max_length."""
    lm, _ = tiny_with_cms()
    prompts = [f"what is my balance{' please' * (i % 4)} -> " for i in range(9)]  # of several lengths
    narrow = encode(lm.tokenizer, prompts, ["balance"] * 9, 32)
    wide = encode(lm.tokenizer, prompts, ["balance"] * 9, 32, row_length=256)
    assert wide.input_ids.shape[0] == 1 and bool((wide.segment >= 0).all())  # one row, no padding
    assert narrow.input_ids.numel() > wide.input_ids.numel() == wide.n_tokens == narrow.n_tokens
    for k in range(9):
        for field in ("input_ids", "position_ids", "completion_mask"):
            assert torch.equal(getattr(wide, field)[wide.segment == k], getattr(narrow, field)[narrow.segment == k])
    cut = encode(lm.tokenizer, ["word " * 100], ["balance"], 16, row_length=64)
    assert cut.n_tokens == 16
    with pytest.raises(ValueError, match="row_length"):
        encode(lm.tokenizer, prompts, ["balance"] * 9, 32, row_length=16)


def test_long_prompt_is_cut_from_the_left_and_completion_kept():
    lm, _ = tiny_with_cms()
    b = encode(lm.tokenizer, ["word " * 100], ["balance"], 16)
    assert b.input_ids.shape[1] == 16
    assert lm.tokenizer.decode(b.input_ids[0][b.completion_mask[0]][:-1]) == "balance"
    with pytest.raises(ValueError, match="more than max_length"):
        encode(lm.tokenizer, ["x"], ["balance " * 20], 16)
    with pytest.raises(ValueError, match="encodes to no tokens"):
        encode(lm.tokenizer, [""], ["balance"], 16)


def test_packed_logprobs_equal_each_example_alone():
    """Parity: packing + head-on-completion-positions equals a plain forward of each example."""
    lm, cms = tiny_with_cms()
    make_nonzero(cms, 0)
    prompts = ["what is my balance -> ", "hi -> ", "book a table for two please -> "]
    comps = ["balance", "restaurant reservation", "alarm"]
    b = encode(lm.tokenizer, prompts, comps, 64)
    assert b.input_ids.shape[0] == 1  # all three share one row
    logp, n = completion_logprobs(lm.model, b)
    for k, (p, c) in enumerate(zip(prompts, comps)):
        ids = lm.tokenizer(p)["input_ids"] + lm.tokenizer(c, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([ids + [lm.tokenizer.eos_token_id]])
        n_prompt = len(lm.tokenizer(p)["input_ids"])
        with torch.no_grad():
            full = lm.model(input_ids=ids).logits.log_softmax(-1)[0]
        ref = sum(full[t - 1, ids[0, t]] for t in range(n_prompt, ids.shape[1]))
        assert int(n[k]) == ids.shape[1] - n_prompt
        torch.testing.assert_close(logp[k].detach(), ref, rtol=1e-5, atol=1e-5)


def test_wake_training_improves_accuracy_on_a_toy_stream():
    torch.manual_seed(0)
    lm, cms = tiny_with_cms(cfg=tiny_cms_config(lr=2e-2))
    labels = sorted({lab for _, lab in TOY})
    texts = [t for t, _ in TOY]
    gold = [lab for _, lab in TOY]

    def accuracy() -> float:
        pred = best_labels(label_scores(lm.model, lm.tokenizer, TEMPLATE, texts, labels, 16, 64), labels)
        return sum(p == g for p, g in zip(pred, gold)) / len(gold)

    before = accuracy()
    pairs = [split_template(TEMPLATE, t, lab) for t, lab in TOY]
    opt = ChunkedOptimizer(cms)
    logs = train_period(lm.model, lm.tokenizer, opt, [p for p, _ in pairs], [c for _, c in pairs], 3, 64, epochs=15)
    assert len(logs) == 30 and cms.step == 30
    assert logs[-1].loss < 0.5 * logs[0].loss
    after = accuracy()
    assert after == 1.0 and after > before


def test_nan_loss_aborts_training():
    lm, cms = tiny_with_cms()
    with torch.no_grad():
        for bank in cms.banks(0):
            for s in cms.active_slots(0):
                bank.B[s].fill_(float("nan"))
    opt = ChunkedOptimizer(cms)
    with pytest.raises(NonFiniteLossError, match="non-finite wake loss"):
        train_period(lm.model, lm.tokenizer, opt, ["a -> "], ["alarm"], 1, 32)
    assert cms.step == 0


def test_prefix_shared_scores_equal_separate_forwards():
    """Parity: the tree-masked scorer equals scoring each (prompt, candidate) pair on its own."""
    from model.memory.wake import score_candidates

    lm, cms = tiny_with_cms()
    make_nonzero(cms, 0)
    prompts = ["what is my balance -> ", "hi -> ", "book a table for two please -> "]
    cands = ["balance", "restaurant reservation", "alarm", "x"]
    got = score_candidates(lm.model, lm.tokenizer, prompts, cands, batch_size=8, max_length=64)
    for i, p in enumerate(prompts):
        ref, _ = completion_logprobs(lm.model, encode(lm.tokenizer, [p] * len(cands), cands, 64))
        torch.testing.assert_close(got[i], ref.detach(), rtol=1e-5, atol=1e-4)


def test_a_trunk_cache_runs_the_layers_below_the_memory_once_for_the_same_prompts_in_every_state():
    from model.decoding.architecture import decoder_of
    from model.decoding.forward import TrunkCache
    from model.memory.wake import score_candidates

    lm, cms = tiny_with_cms()
    make_nonzero(cms, 0)
    prompts = ["what is my balance -> ", "hi -> ", "book a table for two please -> ", "x -> "]
    cands = ["balance", "restaurant reservation", "alarm"]
    start = cms.layer_ids[0]
    assert start > 0
    bottom = decoder_of(lm.model).layers[0]
    runs = []
    bottom.register_forward_hook(lambda m, i, o: runs.append(1))
    trunk = TrunkCache(start)
    plain = score_candidates(lm.model, lm.tokenizer, prompts, cands, batch_size=6, max_length=64)
    n_plain = len(runs)
    first = score_candidates(lm.model, lm.tokenizer, prompts, cands, batch_size=6, max_length=64, trunk=trunk)
    torch.testing.assert_close(first, plain, rtol=1e-5, atol=1e-5)
    assert len(runs) == 2 * n_plain and trunk.misses == n_plain and trunk.hits == 0  # 2 prompts a pass: 2 passes
    make_nonzero(cms, 0, seed=7)  # another state of the memory (above the trunk)
    again = score_candidates(lm.model, lm.tokenizer, prompts, cands, batch_size=6, max_length=64, trunk=trunk)
    assert len(runs) == 2 * n_plain and trunk.hits == n_plain  # the bottom layer did not run again
    torch.testing.assert_close(again, score_candidates(lm.model, lm.tokenizer, prompts, cands, 6, 64), rtol=1e-5,
                               atol=1e-5)
    assert not torch.allclose(again, first)
    with torch.no_grad():  # a layer below the memory changes: the cache does not serve its old hidden states
        bottom.mlp.down_proj.weight.mul_(1.5)
    changed = score_candidates(lm.model, lm.tokenizer, prompts, cands, batch_size=6, max_length=64, trunk=trunk)
    torch.testing.assert_close(changed, score_candidates(lm.model, lm.tokenizer, prompts, cands, 6, 64), rtol=1e-5,
                               atol=1e-5)
    assert trunk.misses == 2 * n_plain and not torch.allclose(changed, again)
    with pytest.raises(ValueError, match="shared prefix"):
        score_candidates(lm.model, lm.tokenizer, prompts, cands, 6, 64, shared_prefix="a -> b\n", trunk=trunk)


def test_grouped_logprobs_equal_each_pair_alone_in_value_and_gradient():
    from model.memory.wake import grouped_logprobs

    lm, cms = tiny_with_cms()
    make_nonzero(cms, 0)
    prompts = ["what is my balance -> ", "hi -> ", "book a table for two please -> "]
    comps = [["balance", "bal", "restaurant reservation"], ["greeting"], ["x", "book", "a table", "reservation"]]
    params = cms.level_parameters(0)
    logp, n = grouped_logprobs(lm.model, lm.tokenizer, prompts, comps, 64)
    grads = torch.autograd.grad(logp.sum(), params, allow_unused=True)
    flat = [(p, c) for p, cs in zip(prompts, comps) for c in cs]
    ref, ref_n = completion_logprobs(lm.model, encode(lm.tokenizer, [p for p, _ in flat], [c for _, c in flat], 64))
    ref_grads = torch.autograd.grad(ref.sum(), params, allow_unused=True)
    torch.testing.assert_close(logp, ref, rtol=1e-5, atol=1e-4)
    assert n.tolist() == ref_n.tolist()
    assert [g is None for g in grads] == [r is None for r in ref_grads] and any(g is not None for g in grads)
    for g, r in zip(grads, ref_grads):
        if g is not None:
            assert g.abs().sum() > 0
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="one non-empty list"):
        grouped_logprobs(lm.model, lm.tokenizer, prompts, comps[:2], 64)
    with pytest.raises(ValueError, match="one non-empty list"):
        grouped_logprobs(lm.model, lm.tokenizer, prompts[:1], [[]], 64)


def test_a_shared_prefix_is_computed_once_and_scores_like_the_concatenated_prompt():
    from model.decoding.loading import tiny_model
    from model.memory.wake import score_candidates

    lm = tiny_model()
    prefix = "play some music -> music\nis it raining -> weather\n"
    prompts = ["wake me up at six -> ", "how much money -> ", "a -> "]  # different lengths: left padding
    cands = ["alarm", "balance", "weather report", "music"]
    joined = score_candidates(lm.model, lm.tokenizer, [prefix + p for p in prompts], cands, 8, 128)
    cached = score_candidates(lm.model, lm.tokenizer, prompts, cands, 8, 128, shared_prefix=prefix)
    torch.testing.assert_close(cached, joined, rtol=1e-5, atol=1e-4)
    one_per_call = score_candidates(lm.model, lm.tokenizer, prompts, cands, 4, 128, shared_prefix=prefix)
    torch.testing.assert_close(one_per_call, joined, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="no room"):
        score_candidates(lm.model, lm.tokenizer, prompts, cands, 8, 20, shared_prefix=prefix * 3)
