"""The sampler: greedy equals Hugging Face generate in every CMS view; seeded sampling is reproducible."""

from __future__ import annotations

import contextlib

import pytest
import torch

from model.config import ModelConfig
from model.decoding import sampling
from model.decoding.loading import ModelNotFoundError, load_base_model
from model.decoding.sampling import (NonFiniteLogitsError, PromptTrunk, SampleGroup, pick_tokens, sample_continuations,
                                     sample_groups)
from tests.model.helpers import make_nonzero, tiny_cms_config, tiny_with_cms

PROMPTS = ["what is my balance ->", "book a table for two please ->", "hi"]
# Different lengths (two of equal length: one prefill run), more prompts than some batch sizes below.
MANY = PROMPTS + ["set an alarm for seven and the quick brown fox", "x", "transfer money", "hi", "the lazy dog ->"]


def generate_ids(lm, prompt: str, n_new: int) -> list[int]:
    """Greedy ``generate`` for one prompt (no padding): the new ids up to EOS."""
    enc = lm.tokenizer(prompt, return_tensors="pt")
    out = lm.model.generate(**enc, max_new_tokens=n_new, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id,
                            eos_token_id=lm.tokenizer.eos_token_id)[0, enc["input_ids"].shape[1]:].tolist()
    eos = lm.tokenizer.eos_token_id
    return out[: out.index(eos)] if eos in out else out


def eos_bias(lm, amount: float) -> torch.utils.hooks.RemovableHandle:
    """Raise EOS's logit so that greedy rows end after different numbers of tokens."""
    eos = lm.tokenizer.eos_token_id

    def hook(module, inputs, out):
        out[..., eos] += amount
        return out

    return lm.model.get_output_embeddings().register_forward_hook(hook)


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_greedy_equals_generate_token_for_token_with_refill_and_compaction(batch_size):
    lm, cms = tiny_with_cms()
    make_nonzero(cms, 0)
    eos_bias(lm, 2.5)  # rows finish at 0..18 tokens: rows leave, waiting prompts join
    refs = [generate_ids(lm, p, 20) for p in MANY]
    assert len({len(r) for r in refs}) >= 4 and min(len(r) for r in refs) < 20
    got = sample_continuations(lm.model, lm.tokenizer, MANY, 1, 20, temperature=0.0, batch_size=batch_size)
    assert [list(s.tokens) for s in got] == refs
    assert [s.finished for s in got] == [len(r) < 20 for r in refs]
    assert [s.text for s in got] == [lm.tokenizer.decode(r, skip_special_tokens=True) for r in refs]


@pytest.mark.parametrize("view", ["teacher", "student", "both_levels"])
def test_greedy_equals_generate_in_every_cms_view(view):
    lm, cms = tiny_with_cms()
    slot = cms.unlock(1, origin="test")
    make_nonzero(cms, 0)
    make_nonzero(cms, 1, seed=2)
    views = {
        "teacher": lambda: cms.levels_masked([], hidden={1: [slot]}),
        "student": lambda: cms.levels_masked([0]),
        "both_levels": contextlib.nullcontext,
    }
    with views[view]():
        refs = [generate_ids(lm, p, 12) for p in MANY]
        got = sample_continuations(lm.model, lm.tokenizer, MANY, 1, 12, temperature=0.0, batch_size=3)
    assert [list(s.tokens) for s in got] == refs
    with cms.levels_masked([0]):  # the views really differ
        other = sample_continuations(lm.model, lm.tokenizer, MANY, 1, 12, temperature=0.0, batch_size=3)
    if view == "both_levels":
        assert [s.tokens for s in other] != [s.tokens for s in got]


def test_dream_mode_routes_through_the_random_experts_like_generate():
    lm, cms = tiny_with_cms()
    cms.unlock(0, origin="test")
    cms.unlock(0, origin="test")  # 3 active experts > top_k 2: the random expert changes the routing
    make_nonzero(cms, 0)
    with torch.no_grad():  # strong experts, so that which ones run shows in the greedy tokens
        for bank in cms.banks(0):
            for a in bank.A:
                a.normal_(0, 1.0, generator=torch.Generator().manual_seed(3))
    prompt = "book a table for two please ->"
    with cms.random_expert_routing(7):  # one row: the router's draws come in the same order as generate's
        ref = generate_ids(lm, prompt, 16)
    with cms.random_expert_routing(7):
        got = sample_continuations(lm.model, lm.tokenizer, [prompt], 1, 16, temperature=0.0)
    assert list(got[0].tokens) == ref
    plain = sample_continuations(lm.model, lm.tokenizer, [prompt], 1, 16, temperature=0.0)
    assert plain[0].tokens != got[0].tokens
    with cms.random_expert_routing(7):  # reproducible for a fixed seed and batch
        again = sample_continuations(lm.model, lm.tokenizer, [prompt] * 3, 2, 16, temperature=1.0, seed=1)
    with cms.random_expert_routing(7):
        same = sample_continuations(lm.model, lm.tokenizer, [prompt] * 3, 2, 16, temperature=1.0, seed=1)
    assert [s.tokens for s in again] == [s.tokens for s in same]


def test_seeded_sampling_is_reproducible_batch_independent_and_leaves_global_rng_alone():
    lm, _ = tiny_with_cms()
    eos_bias(lm, 1.5)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = sample_continuations(lm.model, lm.tokenizer, MANY, 2, 8, temperature=1.0, top_p=0.9, seed=5)
    after = torch.rand(1)
    assert torch.equal(before, after)
    for batch_size in (1, 5, 16):
        b = sample_continuations(lm.model, lm.tokenizer, MANY, 2, 8, temperature=1.0, top_p=0.9, seed=5,
                                 batch_size=batch_size)
        assert [s.tokens for s in b] == [s.tokens for s in a]
    c = sample_continuations(lm.model, lm.tokenizer, MANY, 2, 8, temperature=1.0, top_p=0.9, seed=6)
    assert [s.text for s in c] != [s.text for s in a]
    assert [s.prompt for s in a] == [p for p in MANY for _ in range(2)]
    assert len({s.tokens for s in a[:2]}) == 2  # two draws of one prompt differ


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    picks = {int(pick_tokens(logits, 1.0, 0.7, torch.rand(1, generator=torch.Generator().manual_seed(i))))
             for i in range(200)}
    assert picks == {0, 1}  # 0.5 + 0.3 covers 0.7; the tail is never drawn
    assert int(pick_tokens(logits, 0.0, 1.0, torch.rand(1))) == 0


def test_top_p_equals_a_full_sort_for_small_and_large_nuclei():
    """Rows whose nucleus fits in the top 256, in the top 4096, and only in a full sort."""
    g = torch.Generator().manual_seed(0)
    vocab = 20_000
    logits = torch.randn(6, vocab, generator=g) * torch.tensor([[8.0], [8.0], [1.5], [1.5], [0.1], [0.1]])
    u = torch.rand(6, generator=g)
    for top_p in (0.5, 0.9, 0.99):
        probs = torch.softmax(logits, dim=-1)
        sorted_p, order = probs.sort(dim=-1, descending=True)
        kept = sorted_p.masked_fill(sorted_p.cumsum(-1) - sorted_p >= top_p, 0.0)
        cdf = kept.cumsum(-1)
        ref = order.gather(1, torch.searchsorted(cdf, (u[:, None] * cdf[:, -1:]), right=True))[:, 0]
        sizes = (kept > 0).sum(-1)
        assert sizes.min() < 256 and sizes.max() > 4096 or top_p != 0.99
        assert torch.equal(pick_tokens(logits, 1.0, top_p, u), ref)


def test_stop_string_spanning_two_tokens_cuts_the_text_before_it():
    lm, _ = tiny_with_cms()
    prompt = "the quick brown fox"
    full = sample_continuations(lm.model, lm.tokenizer, [prompt], 1, 16, temperature=0.0)[0]
    tok = lm.tokenizer
    for k in range(1, len(full.tokens) - 1):  # a stop string across the boundary of tokens k-1 and k
        head, text = tok.decode(full.tokens[:k]), tok.decode(full.tokens[: k + 1])
        stop = head[-1:] + text[len(head):][:1]
        if len(stop) == 2 and full.text.find(stop) == len(head) - 1 and text.startswith(head):
            break
    else:
        pytest.skip("no clean two-token boundary in this continuation")
    got = sample_continuations(lm.model, tok, [prompt], 1, 16, temperature=0.0, stop=["never there", stop])[0]
    assert got.finished and got.text == full.text[: len(head) - 1]
    assert list(got.tokens) == list(full.tokens[: k + 1])  # decoding stopped at the token completing it


def test_nan_logits_raise_naming_the_prompt():
    lm, _ = tiny_with_cms()

    def nan_after_first(module, inputs, out):
        return out.masked_fill(torch.zeros_like(out, dtype=torch.bool).index_fill(-1, torch.tensor([5]), True), float("nan"))

    lm.model.get_output_embeddings().register_forward_hook(nan_after_first)
    with pytest.raises(NonFiniteLogitsError, match="non-finite logits while sampling prompt 0 .'hi'. at new token 0"):
        sample_continuations(lm.model, lm.tokenizer, ["hi"], 1, 4, temperature=1.0)


def test_bfloat16_uses_a_cached_copy_and_restores_fp32_weights():
    lm, cms = tiny_with_cms()
    make_nonzero(cms, 0)
    try:
        bf = sample_continuations(lm.model, lm.tokenizer, MANY, 1, 8, temperature=0.0, dtype="bfloat16")
    except ValueError as e:
        pytest.skip(str(e))
    weight = lm.model.model.layers[0].mlp.down_proj.weight
    assert weight.dtype == torch.float32 and all(p.dtype == torch.float32 for p in cms.parameters())
    fp = sample_continuations(lm.model, lm.tokenizer, MANY, 1, 8, temperature=0.0)
    assert [list(s.tokens) for s in fp] == [generate_ids(lm, p, 8) for p in MANY]  # fp32 stays the reference
    agree = sum(a.tokens[:2] == b.tokens[:2] for a, b in zip(bf, fp))
    assert agree >= len(MANY) // 2  # bf16 rounding may change a continuation, not most of them
    copy = sampling._CAST_CACHE[id(weight)][3]
    again = sample_continuations(lm.model, lm.tokenizer, MANY, 1, 8, temperature=0.0, dtype="bfloat16")
    assert sampling._CAST_CACHE[id(weight)][3] is copy and [s.tokens for s in again] == [s.tokens for s in bf]


@pytest.mark.parametrize("n_heads,n_kv", [(4, 4), (9, 3), (8, 1)])
def test_decode_attention_equals_sdpa_over_each_rows_cached_slots(n_heads, n_kv):
    gen = torch.Generator().manual_seed(0)
    n, span, hd = 5, 11, 16
    q = torch.randn(n, n_heads, hd, generator=gen)
    k, v = (torch.randn(n, n_kv, span + 3, hd, generator=gen)[:, :, :span] for _ in range(2))  # strided, as the buffer
    cached = torch.tensor([0, 3, 10, 7, 1])  # the last visible slot of each row
    visible = (torch.arange(span)[None, :] <= cached[:, None])[:, None, None, :]
    got = sampling.decode_attention(q, k, v, visible, scale=0.3)
    ref = torch.nn.functional.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=visible, scale=0.3,
                                                           enable_gqa=True).reshape(n, -1)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # Row 0 sees only its slot 0: its output is that slot's value, whatever the other slots hold.
    torch.testing.assert_close(got[0].view(n_heads, hd), v[0, torch.arange(n_heads) // (n_heads // n_kv), 0])
    half = sampling.decode_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), visible, scale=0.3)
    assert half.dtype == torch.bfloat16 and (half.float() - ref).abs().max() < 0.05


def test_auto_dtype_is_bf16_exactly_where_the_device_runs_it_natively(monkeypatch):
    lm, cms = tiny_with_cms()
    make_nonzero(cms, 0)
    cpu = torch.device("cpu")
    native = sampling.native_bf16(cpu)
    assert sampling.resolve_dtype("auto", cpu) == ("bfloat16" if native else None)
    assert sampling.resolve_dtype("float32", cpu) == "float32" and sampling.resolve_dtype(None, cpu) is None
    auto = sample_continuations(lm.model, lm.tokenizer, MANY, 1, 8, temperature=1.0, seed=3, dtype="auto")
    chosen = sample_continuations(lm.model, lm.tokenizer, MANY, 1, 8, temperature=1.0, seed=3,
                                  dtype="bfloat16" if native else None)
    assert [s.tokens for s in auto] == [s.tokens for s in chosen]
    # A CPU without native bf16: auto falls back to the model's own dtype, explicit bfloat16 is refused.
    monkeypatch.setattr(sampling, "native_bf16", lambda device: False)
    fallback = sample_continuations(lm.model, lm.tokenizer, MANY, 1, 8, temperature=1.0, seed=3, dtype="auto")
    fp = sample_continuations(lm.model, lm.tokenizer, MANY, 1, 8, temperature=1.0, seed=3)
    assert [s.tokens for s in fallback] == [s.tokens for s in fp]
    with pytest.raises(ValueError, match="native bf16.*use float32 or auto"):
        sample_continuations(lm.model, lm.tokenizer, MANY, 1, 8, dtype="bfloat16")


def test_groups_in_one_decode_draw_what_each_group_draws_alone():
    lm, _ = tiny_with_cms()
    eos_bias(lm, 1.5)
    groups = [SampleGroup(MANY[:3], 1, seed=11), SampleGroup(MANY[2:], 3, seed=4), SampleGroup(["hi"], 2, seed=11)]
    together = sample_groups(lm.model, lm.tokenizer, groups, 8, temperature=1.0, top_p=0.9, batch_size=6)
    assert [len(g) for g in together] == [3, 18, 2]
    for group, got in zip(groups, together):
        alone = sample_continuations(lm.model, lm.tokenizer, group.prompts, group.n_per_prompt, 8, temperature=1.0,
                                     top_p=0.9, seed=group.seed)
        assert [(s.prompt, s.tokens, s.text, s.finished) for s in got] == [
            (s.prompt, s.tokens, s.text, s.finished) for s in alone]
    # the first and last groups share a seed: row i of each draws the same uniforms, so "hi" as row 0 of the
    # last group continues as the first group's row 0 would if its prompt were "hi"
    assert together[2][0].tokens == sample_continuations(lm.model, lm.tokenizer, ["hi"], 1, 8, temperature=1.0,
                                                         top_p=0.9, seed=11)[0].tokens
    with pytest.raises(ValueError, match="no prompts"):
        sample_groups(lm.model, lm.tokenizer, [SampleGroup(["x"]), SampleGroup([])], 4)
    with pytest.raises(ValueError, match="no prompts"):
        sample_groups(lm.model, lm.tokenizer, [], 4)
    with pytest.raises(ValueError, match="seed >= 0"):
        sample_groups(lm.model, lm.tokenizer, [SampleGroup(["x"], 1, -1)], 4)


def test_a_prompt_given_several_times_is_prefilled_once_with_the_same_cache_and_logits():
    lm, cms = tiny_with_cms(cfg=tiny_cms_config(n_experts=5))
    while cms.free_slots(0):  # 5 active experts, top-2: dream mode switches on one of the other 3 at random
        cms.unlock(0, origin="test")
    make_nonzero(cms, 0)
    ids = lm.tokenizer(["book a table ->", "hi there", "transfer money"])["input_ids"]
    prompts = [ids[0], ids[0], ids[1], ids[0], ids[2], ids[2]]  # duplicates adjacent or not
    seen = []
    embed = sampling.decoder_of(lm.model).embed
    handle = embed.register_forward_hook(lambda m, i, o: seen.append(i[0].numel()))
    with torch.inference_mode():
        dedup = sampling.StaticKVDecoder(lm.model, 6, 32)
        got = dedup.forward(torch.empty(0, dtype=torch.long), prompts)
        handle.remove()
        one = [sampling.StaticKVDecoder(lm.model, 1, 32) for _ in prompts]
        ref = torch.cat([d.forward(torch.empty(0, dtype=torch.long), [p]) for d, p in zip(one, prompts)])
    assert seen == [sum(len(p) for p in ids)]  # each distinct prompt's tokens went through the model once
    # Dream mode: every token of every row draws its own random expert, so each copy is computed on its own.
    handle = embed.register_forward_hook(lambda m, i, o: seen.append(i[0].numel()))
    with torch.inference_mode(), cms.random_expert_routing(seed=3):
        dreaming = sampling.StaticKVDecoder(lm.model, 6, 32).forward(torch.empty(0, dtype=torch.long), prompts)
    handle.remove()
    assert seen[-1] == sum(len(p) for p in prompts)
    assert not torch.allclose(dreaming[0], dreaming[1])  # two copies of one prompt, two draws of experts
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert dedup.lengths.tolist() == [len(p) for p in prompts]
    for r, d in enumerate(one):
        for layer in range(len(dedup.k)):
            torch.testing.assert_close(dedup.k[layer][r, :, : len(prompts[r])], d.k[layer][0, :, : len(prompts[r])],
                                       atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(dedup.v[layer][r, :, : len(prompts[r])], d.v[layer][0, :, : len(prompts[r])],
                                       atol=1e-5, rtol=1e-5)


def tokens_through(layer: torch.nn.Module, calls: list[int]) -> torch.utils.hooks.RemovableHandle:
    """Count the tokens each pass through decoder ``layer`` computes (appended to ``calls``): the sampler calls
    the layer's pieces, so count at its query projection."""
    return layer.self_attn.q_proj.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[-2]))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_prompt_trunk_skips_the_layers_below_start_and_samples_the_same(temperature):
    lm, cms = tiny_with_cms()
    make_nonzero(cms, 0)
    eos_bias(lm, 2.5)  # rows end at different steps: prompts join while other rows decode
    start = cms.layer_ids[0]
    assert start >= 1
    layers = sampling.decoder_of(lm.model).layers
    trunk = PromptTrunk(start)
    with cms.levels_masked([0]):  # a sleep's student view
        ref = sample_continuations(lm.model, lm.tokenizer, MANY, 2, 12, temperature, seed=4, batch_size=3)
        first = sample_continuations(lm.model, lm.tokenizer, MANY, 2, 12, temperature, seed=4, batch_size=3,
                                     trunk=trunk)
        distinct = len(set(MANY))
        assert (trunk.misses, len(trunk._store)) == (distinct, distinct)
        below, above = [], []
        hooks = [tokens_through(layers[0], below), tokens_through(layers[start], above)]
        again = sample_continuations(lm.model, lm.tokenizer, MANY, 2, 12, temperature, seed=4, batch_size=3,
                                     trunk=trunk)
        for h in hooks:
            h.remove()
    assert [s.tokens for s in first] == [s.tokens for s in ref] == [s.tokens for s in again]
    assert trunk.hits >= distinct and trunk.misses == distinct
    # The second sampling prefilled every prompt from the cache: below start only the tokens fed back to the live
    # rows (each row's tokens but its last; at most a batch of 3 a step); from start up the prompts' tokens too.
    assert max(below) <= 3 and sum(below) == sum(len(s.tokens) + s.finished - 1 for s in again)
    prompt_tokens = sum(len(x) for x in lm.tokenizer(list(dict.fromkeys(MANY)))["input_ids"])
    assert sum(above) - sum(below) >= prompt_tokens


def test_a_prompt_trunk_empties_itself_when_the_trunk_changes_and_keeps_at_most_max_tokens():
    lm, cms = tiny_with_cms()
    start = cms.layer_ids[0]
    trunk = PromptTrunk(start, max_tokens=12)
    ids = lm.tokenizer(MANY)["input_ids"]
    sample_continuations(lm.model, lm.tokenizer, MANY, 1, 6, 0.0, trunk=trunk)
    assert 0 < trunk.tokens <= 12 and trunk.tokens == sum(len(e.hidden) for e in trunk._store.values())
    assert len(trunk._store) < len({tuple(x) for x in ids if len(x) <= 12})  # the oldest went
    with torch.no_grad():  # a layer below start learns (it never does in a sleep): the cache must not be used
        sampling.decoder_of(lm.model).layers[0].mlp.down_proj.weight.mul_(1.5)
    misses = trunk.misses
    got = sample_continuations(lm.model, lm.tokenizer, MANY, 1, 6, 0.0, trunk=trunk)
    assert trunk.misses - misses == len(set(MANY))
    assert [s.tokens for s in got] == [s.tokens for s in sample_continuations(lm.model, lm.tokenizer, MANY, 1, 6, 0.0)]
    with pytest.raises(ValueError, match="memory level lies below"):
        sample_continuations(lm.model, lm.tokenizer, MANY, 1, 6, 0.0, trunk=PromptTrunk(start + 1))
    with pytest.raises(ValueError, match="must be >= 1"):
        PromptTrunk(0)


def test_bad_arguments():
    lm, _ = tiny_with_cms()
    with pytest.raises(ValueError, match="no prompts"):
        sample_continuations(lm.model, lm.tokenizer, [], 1, 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        sample_continuations(lm.model, lm.tokenizer, ["x"], 1, 0)
    with pytest.raises(ValueError, match="stop must be a sequence"):
        sample_continuations(lm.model, lm.tokenizer, ["x"], 1, 4, stop="\n")
    with pytest.raises(ValueError, match="dtype must be"):
        sample_continuations(lm.model, lm.tokenizer, ["x"], 1, 4, dtype="float16")
    with pytest.raises(ValueError, match="encodes to no tokens"):
        sample_continuations(lm.model, lm.tokenizer, ["x", ""], 1, 4)
    with pytest.raises(ValueError, match="top_p"):
        sample_continuations(lm.model, lm.tokenizer, ["x"], 1, 4, top_p=0.0)


def test_min_new_tokens_forbids_early_eos():
    lm, _ = tiny_with_cms()
    eos_bias(lm, 100.0)  # EOS is the overwhelming choice at every step
    early = sample_continuations(lm.model, lm.tokenizer, PROMPTS, 1, 12, temperature=0.0)
    assert all(s.finished and s.text == "" and s.tokens == () for s in early)
    late = sample_continuations(lm.model, lm.tokenizer, PROMPTS, 1, 12, temperature=0.0, min_new_tokens=5)
    assert all(s.finished and len(s.tokens) == 5 for s in late)


@pytest.mark.slow
def test_greedy_equals_generate_on_the_embedded_default():
    try:
        lm = load_base_model(ModelConfig())
    except ModelNotFoundError as e:
        pytest.skip(str(e))
    prompts = ["what is my balance ->", "The capital of France is", "Question: Who wrote Hamlet?\nAnswer:", "hi"]
    got = sample_continuations(lm.model, lm.tokenizer, prompts, 1, 16, temperature=0.0)
    assert [list(s.tokens) for s in got] == [generate_ids(lm, p, 16) for p in prompts]
