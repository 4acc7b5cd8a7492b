"""Knowledge incorporation on a tiny model: each method's effect, single vs continued mode, resume."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from model.config import DreamConfig
import model.evaluation.incorporation as incorporation
from model.evaluation.incorporation import MemorySnapshot, Reader, evaluate_passage, learn, learn_base_dreams
from model.evaluation.incorporation_runs import run_continued, run_single
from model.evaluation.knowledge import QA, Passage
import model.sleep.dreaming as dreaming
from model.sleep.dreaming import task_from_passage
from tests.model.helpers import tiny_with_cms

PASSAGES = [
    (0, Passage("Balance", "The balance of the savings account is shown in the app. Money moves to savings every week.",
                [QA("Where is the balance shown?", "in the app"), QA("When does money move?", "every week")])),
    (1, Passage("Harbor", "The old harbor of Veltra was rebuilt in 1912 by the engineer Mara Quist. Ships bring salt.",
                [QA("Who rebuilt the harbor?", "Mara Quist"), QA("What do ships bring?", "salt")])),
]


def _cfg(**kw) -> DreamConfig:
    base = dict(dreams_per_context=4, max_new_tokens=12, min_new_tokens=4, top_k=2, random_extra=1, trial_steps=2,
                trial_lr=1e-2, lora_r=4, lora_alpha=8.0, rounds=1, rest_steps=1, promote_steps=8, lr=1e-2,
                max_length=96, chat=False, gate={"min_tokens": 1})
    return DreamConfig(**{**base, **kw})


def _fast(cms) -> list[torch.Tensor]:
    return [p.detach().clone() for p in cms.level_parameters(0)]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def _plain_gate(table: pd.DataFrame) -> pd.DataFrame:
    """A stand-in for the Great Expectations gate: every rewarded non-empty dream passes."""
    out = table.copy()
    out["gate_passed"] = out["text"].str.strip() != ""
    out["promoted"] = out["gate_passed"] & (out["reward"] == 1.0)
    return out


def test_base_trains_nothing_and_the_measures_are_in_range():
    lm, cms = tiny_with_cms()
    rows = run_single("base", Reader(lm.model, lm.tokenizer, cms, _cfg(), 0), PASSAGES)
    assert [r["index"] for r in rows] == [0, 1]
    for r in rows:
        assert 0.0 <= r["em"] <= 1.0 and 0.0 <= r["f1"] <= 1.0 and r["tau"] < 0
        assert r["gradient_steps"] == 0 and r["losses"] == [] and len(r["answers"]) == 2
    # run_single leaves the fresh state (a fresh fast expert, B = 0): the output is the base model's.
    task = task_from_passage(PASSAGES[0][1], "passage0", _cfg())
    assert evaluate_passage(lm.model, lm.tokenizer, PASSAGES[0][1], task, _cfg())["tau"] == pytest.approx(rows[0]["tau"])
    assert len(cms.active_slots(0)) == 1
    assert all(float(bank.B[s].detach().abs().sum()) == 0.0 for bank in cms.banks(0) for s in cms.active_slots(0))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_passage_finetune_raises_tau_over_base(seed):
    lm, cms = tiny_with_cms(seed)
    cfg = _cfg()
    base = run_single("base", Reader(lm.model, lm.tokenizer, cms, cfg, seed), PASSAGES)
    slow = [p.detach().clone() for p in cms.level_parameters(1)]
    ft = run_single("passage_finetune", Reader(lm.model, lm.tokenizer, cms, cfg, seed), PASSAGES)
    for b, f in zip(base, ft):
        assert f["tau"] > b["tau"]
        assert f["gradient_steps"] == cfg.promote_steps and f["losses"][-1] < f["losses"][0]
    assert _same(slow, cms.level_parameters(1))  # only the fast level learns


def test_single_mode_starts_every_passage_from_the_same_state():
    cfg = _cfg()
    lm, cms = tiny_with_cms()
    both = run_single("passage_finetune", Reader(lm.model, lm.tokenizer, cms, cfg, 0), PASSAGES)
    lm, cms = tiny_with_cms()  # a new process: the same model, memory and fresh expert
    alone = run_single("passage_finetune", Reader(lm.model, lm.tokenizer, cms, cfg, 0), PASSAGES[1:])
    assert alone[0]["tau"] == pytest.approx(both[1]["tau"], abs=1e-6)  # passage 0 left nothing behind
    assert alone[0]["losses"] == both[1]["losses"]
    lm, cms = tiny_with_cms()
    resumed = run_single("passage_finetune", Reader(lm.model, lm.tokenizer, cms, cfg, 0), PASSAGES, done=[0])
    assert [r["index"] for r in resumed] == [1] and resumed[0]["tau"] == pytest.approx(both[1]["tau"], abs=1e-6)


def test_base_dreams_samples_the_base_model_and_trains_every_dream(monkeypatch):
    lm, cms = tiny_with_cms()
    cfg = _cfg(random_expert=True)  # base_dreams turns the dream mode off whatever the config says
    seen = {}
    real = incorporation.generate_dreams

    def spy(model, tokenizer, cms_, task, cfg_, seed, sampling=None):
        seen["random_expert"] = cfg_.random_expert
        seen["masked"] = all(not any(blk.enabled) for blk in cms_.blocks.values())
        return real(model, tokenizer, cms_, task, cfg_, seed, sampling)

    def no_trials(*a, **k):
        raise AssertionError("base_dreams must not run trials, selection or ReST-EM")

    monkeypatch.setattr(incorporation, "generate_dreams", spy)
    monkeypatch.setattr(dreaming, "run_trials", no_trials)
    monkeypatch.setattr(dreaming, "importance_scores", no_trials)
    incorporation.fresh_fast_expert(cms)
    before = _fast(cms)
    task = task_from_passage(PASSAGES[0][1], "passage0", cfg)
    learned = learn_base_dreams(Reader(lm.model, lm.tokenizer, cms, cfg, seed=3), task)
    assert seen == {"random_expert": False, "masked": True}
    assert all(any(blk.enabled) for blk in cms.blocks.values())  # unmasked again
    n = int((learned.dreams["text"].str.strip() != "").sum())
    assert learned.n_dreams == n == cfg.dreams_per_context and learned.dreams["trained"].all()
    assert learned.funnel == {"generated": cfg.dreams_per_context, "trained": n}
    assert learned.gradient_steps == len(learned.losses) == cfg.promote_steps
    assert not _same(before, _fast(cms))


def test_a_snapshot_restores_weights_experts_and_routing():
    lm, cms = tiny_with_cms()
    snap = MemorySnapshot(cms)
    before = [p.detach().clone() for _, p in cms.named_memory_parameters()]
    cms.unlock(0, "x")
    with torch.no_grad():
        for p in cms.level_parameters(0):
            p.add_(1.0)
    snap.restore(cms)
    assert all(torch.equal(a, p) for a, (_, p) in zip(before, cms.named_memory_parameters()))
    assert cms.active_slots(0) == [0] and all(bank.slots == [0] for bank in cms.banks(0))


def test_sleep_needs_a_gate_and_unknown_methods_fail():
    lm, cms = tiny_with_cms()
    task = task_from_passage(PASSAGES[0][1], "passage0", _cfg())
    with pytest.raises(ValueError, match="needs the dream gate"):
        learn("sleep", Reader(lm.model, lm.tokenizer, cms, _cfg(), 0), task)
    with pytest.raises(ValueError, match="unknown knowledge method 'cms'"):
        learn("cms", Reader(lm.model, lm.tokenizer, cms, _cfg(), 0), task)


def test_sleep_runs_the_dream_stage_and_promotes_what_the_gate_passes():
    lm, cms = tiny_with_cms()
    cfg = _cfg()
    rows = run_single("sleep", Reader(lm.model, lm.tokenizer, cms, cfg, 0, gate=_plain_gate), PASSAGES[:1])
    f = rows[0]["funnel"]
    assert f["generated"] == cfg.dreams_per_context and f["selected"] == cfg.top_k + cfg.random_extra
    assert f["promoted"] == f["rewarded"] == rows[0]["n_dreams"]
    assert rows[0]["gradient_steps"] == (cfg.rest_steps if f["rewarded"] else 0) + (cfg.promote_steps if f["promoted"] else 0)


def test_continued_mode_keeps_training_one_state_and_resumes():
    lm, cms = tiny_with_cms()
    cfg = _cfg()
    fast, slots, learned_rows = {}, {}, []

    def on_learned(k, row, learned):
        fast[k] = _fast(cms)
        slots[k] = (cms.active_slots(0), [list(e.history) for e in cms.experts[0]])
        learned_rows.append(row)

    rows = run_continued("passage_finetune", Reader(lm.model, lm.tokenizer, cms, cfg, 0), PASSAGES, tau_every=1,
                         on_learned=on_learned)
    assert not _same(fast[1], fast[2])  # passage 2 trained the same parameters further
    assert slots[1] == slots[2] and len(slots[1][0]) == 1  # one fast expert throughout: no reset, no new unlock
    assert [r["learned"] for r in learned_rows] == [1, 2] and all("tau_learned" in r for r in learned_rows)
    assert [r["index"] for r in rows] == [0, 1] and all(r["tau"] < 0 and 0 <= r["f1"] <= 1 for r in rows)
    # The state after passage 1 is what single mode would make of passage 0 alone.
    lm1, cms1 = tiny_with_cms()
    single = run_single("passage_finetune", Reader(lm1.model, lm1.tokenizer, cms1, cfg, 0), PASSAGES[:1])
    assert single[0]["losses"] == learned_rows[0]["losses"]
    # Both passages are remembered better at the end than by the base model.
    base = run_single("base", Reader(lm1.model, lm1.tokenizer, cms1, cfg, 0), PASSAGES)
    assert all(r["tau"] > b["tau"] for r, b in zip(rows, base))

    # Resume after passage 1: a state holding it, start=1, gives the same end.
    lm2, cms2 = tiny_with_cms()
    run_continued("passage_finetune", Reader(lm2.model, lm2.tokenizer, cms2, cfg, 0), PASSAGES[:1])
    resumed = run_continued("passage_finetune", Reader(lm2.model, lm2.tokenizer, cms2, cfg, 0), PASSAGES, start=1)
    assert [r["tau"] for r in resumed] == pytest.approx([r["tau"] for r in rows], abs=1e-6)


def test_the_funnel_counts_useful_dreams_the_gate_turned_away_by_check():
    import pandas as pd

    from model.evaluation.incorporation import rewarded_rejections

    gated = pd.DataFrame({"reward": [1.0, 1.0, 0.0, 1.0, float("nan")],
                          "gate_passed": [False, True, False, False, False],
                          "failed_checks": ["copy_of_context;too_short", "", "near_duplicate", "copy_of_context", "too_short"]})
    assert rewarded_rejections(gated) == {"rejected_rewarded:copy_of_context": 2, "rejected_rewarded:too_short": 1}
    assert rewarded_rejections(gated.drop(columns="failed_checks")) == {}
