"""The dream policy (issue #14): the generator's own adapter, on only while dreaming, carried in the state,
trained by ReST-EM inside a sleep and over rounds on a pool of passages."""

from __future__ import annotations

import json
import math

import pytest
import torch

from model.config import DreamConfig, DreamPolicyConfig, PolicyTrainingConfig
from model.evaluation.knowledge import QA, Passage
from model.memory.checkpoint import CheckpointError, load_state, save_state
from model.sleep.dream_policy import (
    POLICY_JSON,
    POLICY_TENSORS,
    DreamPolicyError,
    attach_policy,
    load_policy,
    rest_em_update,
    save_policy,
)
from model.sleep.dreaming import dream_about, generate_dreams, task_from_passage
from model.sleep.policy_training import train_policy
from model.sleep.trials import TrialResult
from tests.model.helpers import logits, tiny_with_cms, toy_batch

PCFG = DreamPolicyConfig(rank=4, alpha=8.0, lr=5e-2)
PASSAGES = [
    Passage("Balance", "The balance of the savings account is shown in the app. Money moves every week.",
            [QA("Where is the balance shown?", "in the app"), QA("When does money move?", "every week")]),
    Passage("Harbor", "The old harbor of Veltra was rebuilt by the engineer Mara Quist. Ships bring salt.",
            [QA("Who rebuilt the harbor?", "Mara Quist")]),
]


def _cfg(**kw) -> DreamConfig:
    base = dict(dreams_per_context=3, max_new_tokens=10, min_new_tokens=4, top_k=2, random_extra=1, trial_steps=2,
                trial_lr=1e-2, lora_r=4, lora_alpha=8.0, rounds=1, rest_steps=2, promote_steps=2, lr=1e-2,
                max_length=96, chat=False, random_expert=False, policy=PCFG)
    return DreamConfig(**{**base, **kw})


def _with_policy(policy_seed: int = 0):
    """The tiny model (always the same base weights) with memory levels and a dream policy seeded ``policy_seed``."""
    lm, cms = tiny_with_cms(0)
    cms.dream_policy = attach_policy(lm.model, PCFG, "tiny", seed=policy_seed)
    return lm, cms


def _perturb(policy, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for b in policy.B:
            b.normal_(0, 0.5, generator=g)


def _always_rewarded(batch):
    """A trial step that rewards every dream (the reward's own computation is tested in test_dreaming)."""
    return [TrialResult(i, -5.0, -4.0, True, 1, 0.0, None) for i in range(len(batch.dreams))]


def test_a_fresh_policy_changes_nothing_and_a_trained_one_only_while_active():
    lm, cms = _with_policy()
    batch = toy_batch(lm)
    plain = logits(lm, batch)
    policy = cms.dream_policy
    assert policy.is_fresh() and len(policy.names) == 2 * len(lm.model.model.layers)  # q_proj, v_proj per layer
    with policy.active():
        assert torch.equal(logits(lm, batch), plain)  # B = 0: the adapter adds exactly zero
    _perturb(policy)
    assert torch.equal(logits(lm, batch), plain)  # off outside active(): questions never see it
    with policy.active():
        assert not torch.allclose(logits(lm, batch), plain)
    assert all(id(p) not in {id(q) for q in lm.model.parameters()} for p in policy.parameters())


def test_a_rest_em_update_trains_the_policy_only():
    lm, cms = _with_policy()
    before_model = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    prompt, dream = "Read: the harbor was rebuilt.\nImplications:\n", " Mara Quist rebuilt the harbor of Veltra."
    losses = rest_em_update(lm.model, lm.tokenizer, cms.dream_policy, [prompt], [dream], 6, 96, origin="test")
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert not cms.dream_policy.is_fresh() and cms.dream_policy.rounds == 1
    assert cms.dream_policy.history == ["test: 1 dreams, 6 steps"]
    for n, p in lm.model.named_parameters():  # the base and every memory level: untouched
        assert torch.equal(p, before_model[n]), n
    assert all(p.grad is None for p in cms.dream_policy.parameters())


def test_dreams_come_from_the_policy_and_rest_em_trains_it_not_the_memory():
    lm, cms = _with_policy()
    task = task_from_passage(PASSAGES[0], "c0", _cfg())
    _perturb(cms.dream_policy)
    _, with_policy = generate_dreams(lm.model, lm.tokenizer, cms, task, _cfg(), seed=3)
    _, without = generate_dreams(lm.model, lm.tokenizer, cms, task, _cfg(policy=PCFG.model_copy(update={"enabled": False})),
                                 seed=3)
    assert with_policy != without  # same seed, another generator

    lm, cms = _with_policy()
    cms.reset_level(0)
    cms.unlock(0, "wake")  # the fast expert the dreams would train (B = 0)
    memory = {n: p.detach().clone() for n, p in cms.named_memory_parameters()}
    rows = dream_about(lm.model, lm.tokenizer, cms, task, _cfg(), period=0, seed=1, run_trials_fn=_always_rewarded)
    assert any(r.reward == 1.0 for r in rows)
    assert cms.dream_policy.rounds == 1 and not cms.dream_policy.is_fresh()
    for n, p in cms.named_memory_parameters():  # ReST-EM moved the policy, not the fast level
        assert torch.equal(p, memory[n]), n

    lm, cms = _with_policy()  # no_dream_policy: the old path, ReST-EM into the fast level
    cms.reset_level(0)
    dream_about(lm.model, lm.tokenizer, cms, task, _cfg(policy=PCFG.model_copy(update={"enabled": False})), period=0,
                seed=1, run_trials_fn=_always_rewarded)
    assert cms.dream_policy.is_fresh() and cms.dream_policy.rounds == 0
    slot = cms.active_slots(0)[0]
    assert any(bool(bank.B[slot].detach().any()) for bank in cms.banks(0))  # unlocked with B = 0, now trained


def test_the_policy_travels_with_the_state_and_round_trips_exactly(tmp_path):
    lm, cms = _with_policy()
    _perturb(cms.dream_policy)
    cms.dream_policy.rounds, cms.dream_policy.history = 3, ["a", "b", "c"]
    save_state(cms, tmp_path / "s")
    manifest = json.loads((tmp_path / "s/manifest.json").read_text())
    assert {POLICY_JSON, POLICY_TENSORS} <= set(manifest["files"]) and manifest["dream_policy"]["rounds"] == 3

    lm2, cms2 = _with_policy(policy_seed=5)
    load_state(cms2, tmp_path / "s")
    assert cms2.dream_policy.digest() == cms.dream_policy.digest()
    assert (cms2.dream_policy.rounds, cms2.dream_policy.history) == (3, ["a", "b", "c"])
    batch = toy_batch(lm)
    with cms.dream_policy.active(), cms2.dream_policy.active():
        assert torch.equal(logits(lm, batch), logits(lm2, batch))

    # A standalone (trained) policy directory round-trips too.
    save_policy(cms.dream_policy, tmp_path / "p")
    lm3, cms3 = _with_policy(policy_seed=7)
    assert load_policy(cms3.dream_policy, tmp_path / "p")["rounds"] == 3
    assert cms3.dream_policy.digest() == cms.dream_policy.digest()


@pytest.mark.parametrize(("damage", "error", "message"), [
    ("missing", DreamPolicyError, r"dream_policy.json: missing"),
    ("corrupt", DreamPolicyError, r"dream_policy.safetensors: checksum mismatch"),
    ("other model", DreamPolicyError, r"dream_policy.json: field 'base_model' is 'another-model'.*another base model"),
    ("rank", DreamPolicyError, r"dream_policy.json: field 'rank'/'targets' \(2,"),
    ("weights", DreamPolicyError, r"dream_policy.safetensors: field 'sha256' does not match the weights"),
])
def test_a_bad_policy_directory_is_one_error_naming_the_file(tmp_path, damage, error, message):
    lm, cms = _with_policy()
    _perturb(cms.dream_policy)
    d = save_policy(cms.dream_policy, tmp_path / "p")
    meta = json.loads((d / POLICY_JSON).read_text())
    if damage == "missing":
        (d / POLICY_JSON).unlink()
    elif damage == "corrupt":
        raw = bytearray((d / POLICY_TENSORS).read_bytes())
        raw[-3] ^= 0xFF
        (d / POLICY_TENSORS).write_bytes(bytes(raw))
    elif damage == "other model":
        (d / POLICY_JSON).write_text(json.dumps({**meta, "base_model": "another-model"}))
    elif damage == "rank":
        (d / POLICY_JSON).write_text(json.dumps({**meta, "rank": 2}))
    else:
        (d / POLICY_JSON).write_text(json.dumps({**meta, "sha256": "0" * 64}))
    lm2, cms2 = _with_policy(policy_seed=3)
    before = cms2.dream_policy.digest()
    with pytest.raises(error, match=message):
        load_policy(cms2.dream_policy, d)
    assert cms2.dream_policy.digest() == before  # nothing loaded


def test_a_corrupt_policy_in_a_state_touches_nothing_else(tmp_path):
    lm, cms = _with_policy()
    _perturb(cms.dream_policy)
    cms.unlock(1, "x")
    with torch.no_grad():
        for p in cms.level_parameters(1, cms.active_slots(1)):
            p.add_(0.1)
    save_state(cms, tmp_path / "s")
    lm2, cms2 = _with_policy(policy_seed=9)
    memory = {n: p.detach().clone() for n, p in cms2.named_memory_parameters()}
    experts, policy = [list(lv) for lv in cms2.experts], cms2.dream_policy.digest()
    (tmp_path / "s" / POLICY_TENSORS).write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match=r"s/dream_policy.safetensors: checksum mismatch"):
        load_state(cms2, tmp_path / "s")
    assert all(torch.equal(p, memory[n]) for n, p in cms2.named_memory_parameters())
    assert cms2.experts == experts and cms2.dream_policy.digest() == policy

    # The manifest's digests match but the policy is of another model: refused before anything loads.
    lm3, cms3 = _with_policy()
    save_state(cms3, tmp_path / "t")
    lm4, cms4 = tiny_with_cms()
    cms4.dream_policy = attach_policy(lm4.model, PCFG, "another-model")
    memory = {n: p.detach().clone() for n, p in cms4.named_memory_parameters()}
    with pytest.raises(DreamPolicyError, match=r"t/dream_policy.json: field 'base_model' is 'tiny'"):
        load_state(cms4, tmp_path / "t")
    assert all(torch.equal(p, memory[n]) for n, p in cms4.named_memory_parameters())


def test_training_the_policy_over_rounds_measures_every_round_and_learns_only_the_policy():
    lm, cms = _with_policy()
    cms.reset_level(0)
    cms.unlock(0, "policy training")
    cfg = _cfg()
    tasks = [task_from_passage(p, f"train{i}", cfg) for i, p in enumerate(PASSAGES)]
    held = [task_from_passage(PASSAGES[0], "passage0", cfg)]
    memory = {n: p.detach().clone() for n, p in cms.named_memory_parameters()}
    seen, ticks = [], []
    stats = train_policy(lm.model, lm.tokenizer, cms, tasks, held, cfg, PolicyTrainingConfig(rounds=2, steps=3), seed=0,
                         on_round=lambda r, measured: seen.append((r, [m.split for m in measured])),
                         on_passage=lambda split, done, total: ticks.append((split, done, total)))
    assert seen == [(0, ["train", "eval"]), (1, ["train", "eval"]), (2, ["train", "eval"])]
    assert ticks == [("train", 1, 2), ("train", 2, 2), ("eval", 1, 1)] * 3
    assert [(s.round, s.split) for s in stats] == [(r, sp) for r in range(3) for sp in ("train", "eval")]
    for s in stats:
        assert s.passages == (2 if s.split == "train" else 1) and s.tokens > 0 and 0 <= s.dreams <= 3 * s.passages
        assert s.rewarded <= s.dreams and (math.isnan(s.share_rewarded) or 0 <= s.share_rewarded <= 1)
    assert cms.dream_policy.rounds == 2 and len(cms.dream_policy.history) == 2
    trained = [s for s in stats if s.split == "train" and s.round < 2]
    assert cms.dream_policy.is_fresh() == all(s.rewarded == 0 for s in trained)
    assert all(s.update_loss is None for s in stats if s.split == "eval" or s.round == 2)
    for n, p in cms.named_memory_parameters():
        assert torch.equal(p, memory[n]), n

    with pytest.raises(ValueError, match="dream.policy.enabled must be true"):
        train_policy(lm.model, lm.tokenizer, cms, tasks, [], _cfg(policy=PCFG.model_copy(update={"enabled": False})),
                     PolicyTrainingConfig(rounds=1), seed=0)


def test_a_large_rest_em_update_trains_on_minibatches():
    from model.sleep.sft import train_on_pairs
    from model.memory.wake import encode, sft_loss

    lm, cms = _with_policy()
    prompts = [f"Passage {i}.\nImplications:\n" for i in range(5)]
    dreams = [f" fact number {i} holds." for i in range(5)]
    params = cms.dream_policy.parameters()
    with cms.dream_policy.active(), torch.no_grad():
        first = float(sft_loss(lm.model, encode(lm.tokenizer, prompts[:2], dreams[:2], 96)))
        whole = float(sft_loss(lm.model, encode(lm.tokenizer, prompts, dreams, 96)))
    with cms.dream_policy.active():
        losses = train_on_pairs(lm.model, lm.tokenizer, params, prompts, dreams, 3, 1e-3, 96, batch_size=2)
    assert len(losses) == 3 and losses[0] == pytest.approx(first, rel=1e-5) and losses[0] != pytest.approx(whole)
    assert not cms.dream_policy.is_fresh()
    lm, cms = _with_policy()
    rest_em_update(lm.model, lm.tokenizer, cms.dream_policy, prompts, dreams, 4, 96, "round 0", batch_size=2, seed=1)
    assert cms.dream_policy.rounds == 1 and not cms.dream_policy.is_fresh()
