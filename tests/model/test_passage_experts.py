"""Passage experts (model/memory/passage_experts.py): continued knowledge incorporation through consolidation into one
read-only expert per passage and routing of every question to its passage's expert."""

from __future__ import annotations

import pytest
import torch

from model.config import DreamConfig, KnowledgeConfig
from model.evaluation.incorporation import Reader, evaluate_passage, uses_passage_experts
from model.evaluation.incorporation_runs import run_continued, run_single
from model.evaluation.knowledge import QA, Passage
from model.memory.cms import CMSError, NoFreeSlotError
from model.memory.passage_experts import (
    add_passage_prototypes,
    consolidate_passage,
    default_features,
    passage_slots,
    passage_view,
    route_questions,
)
from model.memory.prototypes import add_period
from model.sleep.dreaming import task_from_passage
from tests.model.helpers import logits, make_nonzero, tiny_cms_config, tiny_with_cms, toy_batch

PASSAGES = [
    (0, Passage("Balance", "The balance of the savings account is shown in the app. Money moves to savings every week.",
                [QA("Where is the balance shown?", "in the app"), QA("When does money move?", "every week")])),
    (1, Passage("Harbor", "The old harbor of Veltra was rebuilt in 1912 by the engineer Mara Quist. Ships bring salt.",
                [QA("Who rebuilt the harbor?", "Mara Quist"), QA("What do ships bring?", "salt")])),
]


def _cfg() -> DreamConfig:
    return DreamConfig(promote_steps=8, lr=1e-2, max_length=96, chat=False, gate={"min_tokens": 1})


def test_consolidation_copies_the_fast_level_exactly_into_a_read_only_expert_of_its_passage():
    lm, cms = tiny_with_cms()
    batch = toy_batch(lm)
    before = logits(lm, batch)  # nothing learned yet
    cms.begin_period(3)
    make_nonzero(cms, 0)
    fast_out = logits(lm, batch)
    assert not torch.allclose(fast_out, before)
    slots = consolidate_passage(cms, "passage7")
    assert cms.active_slots(0) == []  # the fast level is freed
    assert passage_slots(cms) == slots == passage_slots(cms, 3) and passage_slots(cms, 4) == []
    info = cms.experts[1][slots[0]]
    assert info.frozen and info.period == 3 and info.origin == "passage:passage7"
    with passage_view(cms, 3):  # its passage's view answers as the fast level did
        assert torch.allclose(logits(lm, batch), fast_out, atol=1e-5)
    with passage_view(cms, 2):  # another passage's view, and the learning view, do not see it
        assert torch.allclose(logits(lm, batch), before, atol=1e-6)
    with passage_view(cms, None):
        assert torch.allclose(logits(lm, batch), before, atol=1e-6)
    assert torch.allclose(logits(lm, batch), fast_out, atol=1e-5)  # the view is undone (slot visible again)


def test_consolidation_refuses_a_copy_that_would_not_be_exact_and_a_full_level():
    lm, cms = tiny_with_cms(cfg=tiny_cms_config(n_experts=2))  # slow: the init expert and one free slot
    consolidate_passage(cms, "a")
    cms.unlock(0, origin="x")
    with pytest.raises(NoFreeSlotError, match="no free expert slot"):
        consolidate_passage(cms, "b")
    lm, cms = tiny_with_cms()
    cms.unlock(0, origin="x")  # two fast experts beside the slow level's shared init expert: top-2 would drop one
    with pytest.raises(CMSError, match="would not be exact"):
        consolidate_passage(cms, "c")


def test_passage_prototypes_route_each_question_to_its_passage_and_refuse_other_prototypes():
    protos = None
    for k, (_, p) in enumerate(PASSAGES):
        protos = add_passage_prototypes(protos, default_features(p.context.split(". ")), k)
    assert protos.centroids.shape == (4, 384) and protos.periods.tolist() == [0, 0, 1, 1]
    assert torch.allclose(protos.centroids.norm(dim=1), torch.ones(4))
    questions = [q.question for _, p in PASSAGES for q in p.questions]
    assert route_questions(protos, questions) == [0, 0, 1, 1]
    again = add_passage_prototypes(protos, default_features(["Ships bring salt."]), 1)  # a period is replaced
    assert again.periods.tolist() == [0, 0, 1]
    lifecycle = add_period(None, torch.randn(6, 384), 0, 2, -1, metric="cosine")
    with pytest.raises(CMSError, match="not passage prototypes"):
        add_passage_prototypes(lifecycle, torch.randn(2, 384), 1)
    with pytest.raises(ValueError, match="features"):
        add_passage_prototypes(None, torch.randn(0, 384), 0)


def test_routed_evaluation_in_one_identity_view_equals_the_plain_one():
    lm, cms = tiny_with_cms()
    cfg = _cfg()
    _, passage = PASSAGES[1]
    task = task_from_passage(passage, "p1", cfg)
    plain = evaluate_passage(lm.model, lm.tokenizer, passage, task, cfg)
    seen = []

    def view(period):
        seen.append(period)
        return cms.levels_masked([])

    routed = evaluate_passage(lm.model, lm.tokenizer, passage, task, cfg, [5, 2], view)
    assert sorted(set(seen)) == [2, 5]  # each period answered (and measured) in its own view
    assert routed["tau"] == pytest.approx(plain["tau"], abs=1e-5) and routed["answers"] == plain["answers"]
    with pytest.raises(ValueError, match="routes"):
        evaluate_passage(lm.model, lm.tokenizer, passage, task, cfg, [0], view)


def test_with_passage_experts_a_later_passage_leaves_an_earlier_one_as_it_was_learned():
    cfg = _cfg()
    lm, cms = tiny_with_cms()
    learned = []
    rows = run_continued("passage_finetune", Reader(lm.model, lm.tokenizer, cms, cfg, 0), PASSAGES, tau_every=1,
                         on_learned=lambda k, row, _: learned.append(row), experts=True)
    assert [r["routed_own"] for r in rows] == [1.0, 1.0] and [r["learned"] for r in learned] == [1, 2]
    assert len(passage_slots(cms)) == 2 and cms.active_slots(0) == []
    # Passage 0 alone, answered right after it: the run that went on to passage 1 answers it the same at the end.
    lm1, cms1 = tiny_with_cms()
    alone = run_continued("passage_finetune", Reader(lm1.model, lm1.tokenizer, cms1, cfg, 0), PASSAGES[:1],
                          experts=True)
    assert rows[0]["tau"] == pytest.approx(alone[0]["tau"], abs=1e-5) and rows[0]["answers"] == alone[0]["answers"]
    assert learned[0]["tau_learned"] == pytest.approx(alone[0]["tau"], abs=1e-5)
    lm3, cms3 = tiny_with_cms()
    base = run_single("base", Reader(lm3.model, lm3.tokenizer, cms3, cfg, 0), PASSAGES)
    assert all(r["tau"] > b["tau"] for r, b in zip(rows, base))  # each passage's expert taught its questions
    # Without passage experts passage 1 trains the shared fast level further, and passage 0's answers move.
    shared = [run_continued("passage_finetune", Reader(m.model, m.tokenizer, c, cfg, 0), ps)
              for (m, c), ps in ((tiny_with_cms(), PASSAGES[:1]), (tiny_with_cms(), PASSAGES))]
    assert shared[1][0]["tau"] != pytest.approx(shared[0][0]["tau"], abs=1e-3)


def test_a_saved_state_resumes_with_its_passage_experts_and_prototypes(tmp_path):
    from model.memory.checkpoint import load_state, save_state

    cfg = _cfg()
    lm, cms = tiny_with_cms()
    rows = run_continued("passage_finetune", Reader(lm.model, lm.tokenizer, cms, cfg, 0), PASSAGES, experts=True)
    lm1, cms1 = tiny_with_cms()
    run_continued("passage_finetune", Reader(lm1.model, lm1.tokenizer, cms1, cfg, 0), PASSAGES[:1], experts=True)
    save_state(cms1, tmp_path / "state")
    lm2, cms2 = tiny_with_cms(seed=0)
    load_state(cms2, tmp_path / "state")
    assert passage_slots(cms2) == passage_slots(cms1) and torch.equal(cms2.prototypes.centroids,
                                                                      cms1.prototypes.centroids)
    resumed = run_continued("passage_finetune", Reader(lm2.model, lm2.tokenizer, cms2, cfg, 0), PASSAGES, start=1,
                            experts=True)
    assert [r["tau"] for r in resumed] == pytest.approx([r["tau"] for r in rows], abs=1e-6)
    assert [r["routed_own"] for r in resumed] == [1.0, 1.0]


def test_a_run_with_too_few_slots_for_its_passages_fails_before_anything_trains():
    lm, cms = tiny_with_cms(cfg=tiny_cms_config(n_experts=2))  # one free slowest-level slot for two passages
    before = [p.detach().clone() for _, p in cms.named_memory_parameters()]
    with pytest.raises(NoFreeSlotError, match=r"2 passages to learn.*1 free expert slots.*n_experts = 2.*at least 3"):
        run_continued("passage_finetune", Reader(lm.model, lm.tokenizer, cms, _cfg(), 0), PASSAGES, experts=True)
    assert all(torch.equal(a, b) for a, (_, b) in zip(before, cms.named_memory_parameters()))


def test_which_methods_use_passage_experts():
    assert uses_passage_experts("passage_sleep", "sleep") and uses_passage_experts("sleep", "sleep")
    assert not uses_passage_experts("passage_finetune", "sleep") and not uses_passage_experts("base", "all")
    assert uses_passage_experts("passage_finetune", "all") and not uses_passage_experts("passage_sleep", "none")
    with pytest.raises(ValueError, match="passage_experts"):
        uses_passage_experts("sleep", "some")
    assert KnowledgeConfig().passage_experts == "sleep"
    with pytest.raises(ValueError, match="passage_experts"):
        KnowledgeConfig(passage_experts="every")
