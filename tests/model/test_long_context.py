"""Long-context documents (bAbI / needles in distractor prose) and how the methods read them, on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model.config import CMSConfig, ConsolidationConfig, LevelConfig
from model.data.stream import DataError
from model.decoding.loading import tiny_model, tiny_tokenizer
from model.evaluation.long_context import (
    build_document,
    count_tokens,
    load_babi,
    load_distractors,
    needle_items,
    question_prompt,
    tail_context,
)
from model.evaluation.long_context_methods import (
    answer_from_memory,
    answer_retrieval,
    boundary_prompts,
    document_pieces,
    read_cms,
    sleep_levels,
    slow_levels,
)
from model.memory.cms import attach_cms

REPO = Path(__file__).resolve().parents[2]
QA1 = REPO / "data/raw/babi/qa1_single-supporting-fact_test.txt"
PROSE = [f"The weather in a town far away was fine on day {i}." for i in range(40)]


def test_babi_story_gives_its_last_question_the_statements_before_it_and_the_files_answers():
    items = load_babi(QA1)
    assert len(items) == 200 and {i.task for i in items} == {"qa1"}
    first = items[0]
    # The test file's first story: 15 lines, its last question "Where is Sandra?" (kitchen) on line 15.
    assert first.question == "Where is Sandra?" and first.answer == "kitchen"
    assert first.facts[0] == "John travelled to the hallway." and first.facts[-1] == "Sandra moved to the kitchen."
    assert len(first.facts) == 10
    assert not any("?" in f for f in first.facts)
    assert set(first.candidates) == {"bathroom", "bedroom", "garden", "hallway", "kitchen", "office"}
    assert all(i.answer in i.candidates for i in items) and len({i.item_id for i in items}) == 200


def test_babi_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "qa1_x_test.txt"
    bad.write_text("1 Mary moved to the bathroom.\n2 Where is Mary?\tbathroom\t1\n1 John went to the garden.\n")
    with pytest.raises(DataError, match=r"qa1_x_test.txt: the story starting at line 3 has no question"):
        load_babi(bad)
    bad.write_text("1 Mary moved.\n2 Where is Mary?\n")
    with pytest.raises(DataError, match="line 2: a question line needs"):
        load_babi(bad)
    bad.write_text("")
    with pytest.raises(DataError, match="no stories"):
        load_babi(bad)


def test_needles_ask_one_of_their_keys_and_are_seeded():
    a, b = needle_items(5, 4, seed=3), needle_items(5, 4, seed=3)
    assert a == b and a != needle_items(5, 4, seed=4)
    for item in a:
        assert len(item.facts) == 4 and len(set(item.candidates)) == 4 and item.answer in item.candidates
        key = item.question.removeprefix("What is the secret number of the ").removesuffix("?")
        assert any(f"the {key} is {item.answer}." in f for f in item.facts)


def test_document_hides_every_fact_in_order_within_the_length_and_is_seeded():
    tok = tiny_tokenizer()
    item = load_babi(QA1)[0]
    doc = build_document(tok, item, PROSE, 1500, seed=0)
    longest = max(count_tokens(tok, " " + s) for s in PROSE)
    assert 1500 - longest <= doc.n_tokens <= 1500
    at = [doc.text.index(f) for f in item.facts]
    assert at == sorted(at) and len(doc.fact_tokens) == len(item.facts)
    assert doc.fact_tokens == sorted(doc.fact_tokens) and doc.fact_tokens[-1] < doc.n_tokens
    again = build_document(tok, item, PROSE, 1500, seed=0)
    assert again.text == doc.text
    assert build_document(tok, item, PROSE, 1500, seed=1).text != doc.text


def test_too_short_a_length_and_an_empty_source_are_errors(tmp_path):
    tok = tiny_tokenizer()
    item = load_babi(QA1)[0]
    with pytest.raises(DataError, match=r"length 40 tokens is shorter than the facts of .*qa1_single"):
        build_document(tok, item, PROSE, 40, seed=0)
    with pytest.raises(DataError, match="distractor source is empty"):
        build_document(tok, item, [], 1000, seed=0)
    empty = tmp_path / "prose.json"
    empty.write_text(json.dumps([]))
    with pytest.raises(DataError, match="prose.json"):
        load_distractors(empty)


def test_tail_context_keeps_the_documents_end_within_the_budget():
    tok = tiny_tokenizer()
    text = " ".join(PROSE)
    tail = tail_context(tok, text, 60)
    assert text.endswith(tail) and count_tokens(tok, tail) <= 60 and tail[0].isupper()
    assert question_prompt("Where?", "ctx") == "ctx\n\nQuestion: Where?\nAnswer:"
    assert question_prompt("Where?") == "Question: Where?\nAnswer:"


def test_pmi_scoring_subtracts_each_candidates_likelihood_after_the_content_free_prompt():
    from model.evaluation.long_context import NULL_PROMPT, answer
    from model.memory.wake import score_candidates

    lm = tiny_model(seed=3)
    prompts = ["Question: Where is Mary?\nAnswer:", "Question: Where is John?\nAnswer:"]
    cands = ["garden", "office", "kitchen", "bedroom"]
    raw = score_candidates(lm.model, lm.tokenizer, prompts, [" " + c for c in cands], 16, 64)
    null = score_candidates(lm.model, lm.tokenizer, [NULL_PROMPT], [" " + c for c in cands], 16, 64)
    assert answer(lm.model, lm.tokenizer, prompts, cands, 64, "loglik") == raw.argmax(1).tolist()
    assert answer(lm.model, lm.tokenizer, prompts, cands, 64, "pmi") == (raw - null).argmax(1).tolist()
    assert not torch.allclose(null, torch.zeros_like(null))
    with pytest.raises(ValueError, match="scoring"):
        answer(lm.model, lm.tokenizer, prompts, cands, 64, "exact")


def test_retrieval_puts_the_most_similar_piece_in_the_prompt():
    lm = tiny_model()
    item = load_babi(QA1)[0]
    doc = build_document(lm.tokenizer, item, PROSE, 2000, seed=0)

    def overlap(questions, pieces):  # words shared with the question: the piece naming Sandra wins
        return [len(set(q.lower().strip("?").split()) & set(p.lower().split())) for q, p in zip(questions, pieces)]

    chosen, best = answer_retrieval(lm.model, lm.tokenizer, doc, 256, overlap)
    room = 256 - len(lm.tokenizer(question_prompt(item.question))["input_ids"]) - 4 \
        - max(count_tokens(lm.tokenizer, " " + c) for c in item.candidates)
    from model.evaluation.knowledge import passage_chunks

    assert "Sandra" in passage_chunks(lm.tokenizer, doc.text, room)[best]
    assert 0 <= chosen < len(item.candidates)


def test_boundary_prompts_end_at_sentence_ends_and_are_seeded():
    tok = tiny_tokenizer()
    pieces = [" ".join(PROSE[:10]), " ".join(PROSE[10:20])]
    prompts = boundary_prompts(tok, pieces, 5, 12, seed=0)
    assert len(prompts) == 5 and all(p.endswith(".") and count_tokens(tok, p) <= 12 for p in prompts)
    assert len(set(prompts)) == 5  # five different sentence ends
    assert prompts == boundary_prompts(tok, pieces, 5, 12, seed=0) != boundary_prompts(tok, pieces, 5, 12, seed=1)


def _cms_cfg() -> CMSConfig:
    common = {"lr": 1e-2, "n_experts": 4, "d_low": 8, "top_k": 4}
    return CMSConfig(top_layers=2, levels=[LevelConfig(name="fast", chunk_size=1, **common),
                                           LevelConfig(name="slow", chunk_size=4, **common)])


def test_sleep_levels_chain_slower_levels_on_the_sleep_schedule():
    cfg = sleep_levels(_cms_cfg(), 3, sleep_every=2)
    assert [lv.name for lv in cfg.levels] == ["fast", "slow1", "slow2", "slow3"]
    assert [lv.chunk_size for lv in cfg.levels] == [1, 2, 8, 32]
    assert slow_levels("sleep_2") == 2 and slow_levels("cms") == 0
    with pytest.raises(ValueError, match="only one"):
        sleep_levels(CMSConfig(top_layers=2, levels=[LevelConfig(name="fast", chunk_size=1, lr=1e-2)]), 1, 2)


def test_a_sleep_reader_consolidates_on_schedule_then_every_level_at_the_end():
    lm = tiny_model()
    cms = attach_cms(lm.model, sleep_levels(_cms_cfg(), 2, sleep_every=2), seed=0)
    item = load_babi(QA1)[0]
    doc = build_document(lm.tokenizer, item, PROSE, 900, seed=0)
    pieces = document_pieces(lm.tokenizer, doc, 160)
    assert len(pieces) >= 5
    cons = ConsolidationConfig(steps=2, batch_size=2, alpha=1.0, gamma=0.0, max_new_tokens=4, prompt_buffer_size=6)
    reading = read_cms(lm.model, lm.tokenizer, cms, pieces, 176, 1, 2, cons, seed=0, prompt_tokens=16)
    n_periods = -(-len(pieces) // 2)
    # Every period but the last: fast -> slow1 (slow2's chunk, 8 steps, fires at most once); the last: slow1 ->
    # slow2 then fast -> slow1, slowest first.
    pairs = [(s["src"], s["dst"]) for s in reading.sleeps]
    assert pairs[-2:] == [(1, 2), (0, 1)]
    assert pairs.count((0, 1)) == n_periods
    assert reading.gradient_steps == len(pieces) + 2 * len(pairs)
    assert cms.active_slots(2), "the slowest level holds what was consolidated into it"
    assert answer_from_memory(lm.model, lm.tokenizer, doc, 176) in range(len(item.candidates))


def test_a_cms_reader_without_sleep_only_wakes():
    lm = tiny_model()
    cms = attach_cms(lm.model, _cms_cfg(), seed=0)
    doc = build_document(lm.tokenizer, needle_items(1, 3, seed=0)[0], PROSE, 600, seed=0)
    pieces = document_pieces(lm.tokenizer, doc, 128)
    before = {n: p.detach().clone() for n, p in cms.named_memory_parameters()}
    reading = read_cms(lm.model, lm.tokenizer, cms, pieces, 144, 2, 3, None, seed=0)
    assert reading.sleeps == [] and reading.gradient_steps == 2 * len(pieces) and cms.step == 2 * len(pieces)
    assert any(not torch.equal(before[n], p) for n, p in cms.named_memory_parameters())


def test_facts_only_asks_after_the_facts_alone_whatever_the_documents_length():
    from model.evaluation.long_context import answer
    from model.evaluation.long_context_methods import answer_facts_only

    lm = tiny_model(seed=3)
    item = load_babi(QA1)[0]
    short, long = (build_document(lm.tokenizer, item, PROSE, n, seed=0) for n in (400, 2000))
    alone = question_prompt(item.question, " ".join(item.facts))
    want = answer(lm.model, lm.tokenizer, [alone], item.candidates, 512, "pmi")[0]
    assert answer_facts_only(lm.model, lm.tokenizer, short, 512) == want
    assert answer_facts_only(lm.model, lm.tokenizer, long, 512) == want  # the prose never enters the prompt
    with pytest.raises(ValueError, match="no room"):
        answer_facts_only(lm.model, lm.tokenizer, short, 8)
