"""One adapter for the decoder internals: the split forward pass, the sampler and the CMS on Llama, Qwen2, Qwen3."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from model.decoding.architecture import Decoder, UnsupportedArchitectureError, decoder_of
from model.decoding.forward import prefix_hidden, suffix_hidden, suffix_logprobs
from model.decoding.loading import LoadedModel, tiny_model, tiny_tokenizer
from model.decoding.sampling import StaticKVDecoder, sample_continuations
from model.errors import UserError
from model.memory.cms import CMSBlock, attach_cms
from model.memory.wake import completion_logprobs, score_candidates
from tests.model.helpers import logits, make_nonzero, tiny_cms_config, toy_batch

FAMILIES = ["llama", "qwen2", "qwen3"]
PROMPTS = ["what is my balance ->", "book a table for two please ->", "hi", "set an alarm for seven and the", "x"]


def _common(tokenizer) -> dict:
    return dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
                initializer_range=0.2, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)


def tiny(family: str, seed: int = 0) -> LoadedModel:
    """A tiny random model of ``family``: Qwen2's q/k/v biases and Qwen3's q/k norms are random, not 0/1."""
    if family == "llama":
        return tiny_model(seed=seed)
    tokenizer = tiny_tokenizer()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if family == "qwen2":
            model = Qwen2ForCausalLM(Qwen2Config(**_common(tokenizer)))
        else:  # head_dim 32, not hidden / heads = 16, as in the real Qwen3 models
            model = Qwen3ForCausalLM(Qwen3Config(**_common(tokenizer), head_dim=32))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
                    p.normal_(0, 0.5)
                elif name.endswith(("q_norm.weight", "k_norm.weight")):
                    p.uniform_(0.5, 1.5)
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, name=f"tiny-{family}")


def generate_ids(lm: LoadedModel, prompt: str, n_new: int) -> list[int]:
    enc = lm.tokenizer(prompt, return_tensors="pt")
    out = lm.model.generate(**enc, max_new_tokens=n_new, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id,
                            eos_token_id=lm.tokenizer.eos_token_id)[0, enc["input_ids"].shape[1]:].tolist()
    eos = lm.tokenizer.eos_token_id
    return out[: out.index(eos)] if eos in out else out


@pytest.mark.parametrize("family", FAMILIES)
def test_the_adapter_names_the_pieces(family):
    lm = tiny(family)
    dec = decoder_of(lm.model)
    assert isinstance(dec, Decoder) and dec.family == family
    assert dec.layers is lm.model.model.layers and dec.embed is lm.model.model.embed_tokens
    assert dec.norm is lm.model.model.norm and dec.head is lm.model.get_output_embeddings()
    assert (dec.n_heads, dec.n_kv_heads, dec.head_dim) == (4, 2, 32 if family == "qwen3" else 16)
    assert dec.scaling == dec.head_dim**-0.5
    assert dec.qk_norm == (family == "qwen3")
    assert [v.module for v in dec.views] == list(dec.layers)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_split_forward_pass_equals_the_models_own_forward(family):
    lm = tiny(family)
    batch = toy_batch(lm)  # packed rows: the block-diagonal mask comes from the restarting position ids
    ref = logits(lm, batch)
    head = lm.model.get_output_embeddings()
    for start in range(len(decoder_of(lm.model).layers) + 1):
        h = prefix_hidden(lm.model, batch.input_ids, batch.position_ids, start)
        with torch.no_grad():
            got = head(suffix_hidden(lm.model, h, batch.position_ids, start))
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        logp, n = completion_logprobs(lm.model, batch)
        h = prefix_hidden(lm.model, batch.input_ids, batch.position_ids, 2)
        got_logp, got_n = suffix_logprobs(lm.model, h, batch, 2)
    torch.testing.assert_close(got_logp, logp, rtol=1e-5, atol=1e-5)
    assert torch.equal(got_n, n)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_static_kv_decoder_equals_the_models_forward_and_generate(family):
    lm = tiny(family)
    cms = attach_cms(lm.model, tiny_cms_config(), seed=0)  # the sampler runs through the CMS blocks
    make_nonzero(cms, 0)
    ids = [lm.tokenizer(p)["input_ids"] for p in sorted(PROMPTS, key=len)]
    with torch.inference_mode():
        got = StaticKVDecoder(lm.model, len(ids), 40).forward(torch.empty(0, dtype=torch.long), ids)
        ref = torch.stack([lm.model(input_ids=torch.tensor([p])).logits[0, -1] for p in ids])
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    refs = [generate_ids(lm, p, 12) for p in PROMPTS]
    for batch_size in (1, 2, 5):  # refill and compaction
        out = sample_continuations(lm.model, lm.tokenizer, PROMPTS, 1, 12, temperature=0.0, batch_size=batch_size)
        assert [list(s.tokens) for s in out] == refs


@pytest.mark.parametrize("family", FAMILIES)
def test_the_cms_attaches_and_changes_the_output(family):
    lm = tiny(family)
    batch = toy_batch(lm)
    before = logits(lm, batch)
    cms = attach_cms(lm.model, tiny_cms_config(), seed=0)
    layers = decoder_of(lm.model).layers
    assert cms.layer_ids == [2, 3]
    assert [isinstance(layer.mlp, CMSBlock) for layer in layers] == [False, False, True, True]
    torch.testing.assert_close(logits(lm, batch), before)  # B starts at zero: no change yet
    make_nonzero(cms, 0)
    assert not torch.allclose(logits(lm, batch), before, atol=1e-4)
    with cms.levels_masked([0]):
        torch.testing.assert_close(logits(lm, batch), before)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_shared_prefix_cache_scores_like_the_concatenated_prompt(family):
    lm = tiny(family)
    prefix = "play some music -> music\nis it raining -> weather\n"
    prompts = ["wake me up at six -> ", "how much money -> ", "a -> "]
    cands = ["alarm", "balance", "weather report"]
    joined = score_candidates(lm.model, lm.tokenizer, [prefix + p for p in prompts], cands, 8, 128)
    cached = score_candidates(lm.model, lm.tokenizer, prompts, cands, 8, 128, shared_prefix=prefix)
    torch.testing.assert_close(cached, joined, rtol=1e-5, atol=1e-4)


def _gpt2() -> GPT2LMHeadModel:
    return GPT2LMHeadModel(GPT2Config(vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=2))


def _mistral() -> MistralForCausalLM:  # Llama-shaped, but not a family the adapter knows
    return MistralForCausalLM(MistralConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=2, num_key_value_heads=1))


@pytest.mark.parametrize("build, named", [(_gpt2, r"model_type 'gpt2' \(GPT2LMHeadModel\)"),
                                          (_mistral, r"model_type 'mistral' \(MistralForCausalLM\)")])
def test_an_unsupported_architecture_raises_naming_it(build, named):
    model = build().eval()
    with pytest.raises(UnsupportedArchitectureError, match=named + r" is not supported.*'llama', 'qwen2', 'qwen3'"):
        decoder_of(model)
    with pytest.raises(UnsupportedArchitectureError, match=named):
        attach_cms(model, tiny_cms_config())
    with pytest.raises(UnsupportedArchitectureError, match=named):
        prefix_hidden(model, torch.zeros(1, 4, dtype=torch.long), torch.arange(4)[None], 1)
    with pytest.raises(UnsupportedArchitectureError, match=named):
        sample_continuations(model, tiny_tokenizer(), ["hi"], 1, 2, temperature=0.0)
    err = UnsupportedArchitectureError("x")  # a user error (one line from the CLI), a ValueError as CMSError
    assert isinstance(err, UserError) and isinstance(err, ValueError)


def test_sliding_window_attention_is_refused():
    tok = tiny_tokenizer()
    model = Qwen2ForCausalLM(Qwen2Config(**_common(tok), use_sliding_window=True, sliding_window=8, max_window_layers=2))
    with pytest.raises(UnsupportedArchitectureError, match=r"model_type 'qwen2' \(Qwen2ForCausalLM\): decoder layer 2 "
                                                           r"uses sliding-window attention"):
        decoder_of(model)


def test_a_known_model_type_with_missing_pieces_raises_naming_them():
    lm = tiny("qwen3")
    del lm.model.model.layers[1].self_attn.k_norm
    with pytest.raises(UnsupportedArchitectureError, match=r"'qwen3' \(Qwen3ForCausalLM\): decoder layer 1 lacks "
                                                           r"\['k_norm'\]"):
        decoder_of(lm.model)
