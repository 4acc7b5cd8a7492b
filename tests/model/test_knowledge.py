"""SQuAD passages as knowledge tasks: loading, QA prompts, answer log-likelihood, no-context answers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from model.data.stream import DataError
from model.decoding.loading import LoadedModel, tiny_model
from model.decoding.sampling import Sample
import model.evaluation.knowledge as knowledge
from model.evaluation.knowledge import (
    QA,
    Passage,
    answer_completion,
    answer_loglik,
    answer_questions,
    load_passages,
    no_context_accuracy,
    qa_prompt,
)
from model.memory.wake import encode, sft_loss, split_template

SQUAD = Path(__file__).resolve().parents[2] / "data" / "raw" / "squad"
GOOD = {"title": "T", "context": "Some passage.", "questions": [{"question": "Q?", "answer": "A"}]}


@pytest.fixture(scope="module")
def passage() -> Passage:
    """The first SEAL training passage, cut to 2 questions to keep the tiny-model tests fast."""
    first = load_passages(SQUAD / "squad_train_seal100.json")[0]
    return Passage(first.title, first.context, first.questions[:2])


@pytest.fixture(scope="module")
def lm() -> LoadedModel:
    return tiny_model(seed=0)


# load_passages


@pytest.mark.parametrize(
    ("name", "n_passages", "n_questions", "has_index"),
    [
        ("squad_train_seal100.json", 100, 467, False),
        ("squad_val_seal_eval200.json", 200, 974, True),
        ("squad_val_dev800.json", 800, 4170, True),
    ],
)
def test_load_real_files(name: str, n_passages: int, n_questions: int, has_index: bool) -> None:
    passages = load_passages(SQUAD / name)
    assert len(passages) == n_passages
    assert sum(len(p.questions) for p in passages) == n_questions
    assert all(p.title and p.context and p.questions for p in passages)
    assert all(isinstance(qa, QA) and qa.question and qa.answer for p in passages for qa in p.questions)
    indices = [p.squad_val_index for p in passages]
    if has_index:
        assert all(isinstance(i, int) for i in indices) and len(set(indices)) == n_passages
    else:
        assert indices == [None] * n_passages


def test_real_files_are_disjoint() -> None:
    contexts = [{p.context for p in load_passages(SQUAD / name)} for name in sorted(p.name for p in SQUAD.glob("*.json"))]
    assert len(contexts) == 3
    assert sum(len(c) for c in contexts) == len(set().union(*contexts))


def test_load_strips_strings(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps([{"title": " T ", "context": " C. ", "questions": [{"question": " Q? ", "answer": " A "}]}]))
    (p,) = load_passages(path)
    assert (p.title, p.context, p.questions) == ("T", "C.", [QA("Q?", "A")])


def _with(**changes: Any) -> dict[str, Any]:
    return {**GOOD, **changes}


@pytest.mark.parametrize(
    ("content", "fragments"),
    [
        ({"passages": []}, ["expected a JSON list of passages, got dict"]),
        ([], ["list of passages is empty"]),
        ([GOOD, 3], ["passage 1 must be an object", "int 3"]),
        ([GOOD, {"title": "T", "questions": GOOD["questions"]}], ["passage 1", "'context'", "a missing value"]),
        ([_with(context="  ")], ["passage 0", "'context' is empty"]),
        ([_with(title=7)], ["passage 0", "'title'", "int 7"]),
        ([GOOD, _with(questions=[])], ["passage 1 has no questions", "'questions'"]),
        ([_with(questions={"question": "Q?", "answer": "A"})], ["passage 0", "'questions' must be a list", "dict"]),
        ([_with(questions=None)], ["passage 0", "'questions' must be a list", "a missing value"]),
        ([_with(questions=["Q?"])], ["passage 0: questions[0] must be an object", "str 'Q?'"]),
        (
            [GOOD, _with(questions=[{"question": "Q?", "answer": "A"}, {"question": "Q2?", "answer": 1758}])],
            ["passage 1: questions[1]", "'answer' must be a string", "int 1758"],
        ),
        ([_with(questions=[{"answer": "A"}])], ["passage 0: questions[0]", "'question'", "a missing value"]),
        ([_with(questions=[{"question": "Q?", "answer": ""}])], ["passage 0: questions[0]", "'answer' is empty"]),
        ([_with(squad_val_index="3")], ["passage 0", "'squad_val_index'", "str '3'"]),
        ([_with(squad_val_index=True)], ["passage 0", "'squad_val_index'", "bool True"]),
    ],
)
def test_malformed_files_name_file_passage_and_field(tmp_path: Path, content: Any, fragments: list[str]) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(content), encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_passages(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ")
    for fragment in fragments:
        assert fragment in message


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="passages file not found"):
        load_passages(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("[{", encoding="utf-8")
    with pytest.raises(DataError, match="bad.json: not valid JSON"):
        load_passages(bad)


# prompts


def test_qa_prompt_and_completion() -> None:
    assert qa_prompt(" Who ruled? ") == "Question: Who ruled?\nAnswer:"
    assert qa_prompt("Who?", "Q: {question} {A}:") == "Q: Who? {A}:"
    assert answer_completion(" Otrar ") == " Otrar"
    with pytest.raises(ValueError, match="no '\\{question\\}' placeholder"):
        qa_prompt("Who?", "Question: {q}")


def test_encode_trains_exactly_the_answer(lm: LoadedModel) -> None:
    tok = lm.tokenizer
    batch = encode(tok, [qa_prompt("Who?")], [answer_completion("Otrar")], 64)
    answer_ids = tok(" Otrar", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert batch.input_ids[batch.completion_mask].tolist() == answer_ids


# answer_loglik


def test_answer_loglik_is_a_deterministic_mean(lm: LoadedModel, passage: Passage) -> None:
    lm.model.train()
    value = answer_loglik(lm.model, lm.tokenizer, passage, batch_size=2)
    assert lm.model.training  # the mode is restored
    lm.model.eval()
    assert isinstance(value, float) and value < 0.0
    assert answer_loglik(lm.model, lm.tokenizer, passage, batch_size=2) == value
    # pooled over tokens, so the batching does not change it
    assert answer_loglik(lm.model, lm.tokenizer, passage, batch_size=16) == pytest.approx(value, abs=1e-5)


def _train(model, batch, steps: int = 4) -> None:
    """A few plain SGD steps of SFT on ``batch`` (every weight of the tiny model)."""
    model.requires_grad_(True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        sft_loss(model, batch).backward()
        opt.step()
    model.eval()


def test_answer_loglik_rises_when_the_answers_are_trained(passage: Passage) -> None:
    trained = tiny_model(seed=0)
    model, tok = trained.model, trained.tokenizer
    before = answer_loglik(model, tok, passage)
    prompts = [qa_prompt(qa.question) for qa in passage.questions]
    batch = encode(tok, prompts, [answer_completion(qa.answer) for qa in passage.questions], 256)
    _train(model, batch)
    after = answer_loglik(model, tok, passage)
    assert after > before + 1.0


def test_answer_loglik_rejects_bad_input(lm: LoadedModel, passage: Passage) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        answer_loglik(lm.model, lm.tokenizer, passage, batch_size=0)
    with pytest.raises(ValueError, match="no questions"):
        answer_loglik(lm.model, lm.tokenizer, Passage("T", "C", []))


# answer_questions and no_context_accuracy


def test_answer_questions_greedy(lm: LoadedModel, passage: Passage) -> None:
    questions = [qa.question for qa in passage.questions]
    answers = answer_questions(lm.model, lm.tokenizer, questions, max_new_tokens=4)
    assert len(answers) == len(questions)
    assert all(isinstance(a, str) and "\n" not in a and a == a.strip() for a in answers)
    assert answer_questions(lm.model, lm.tokenizer, questions, max_new_tokens=4) == answers
    assert answer_questions(lm.model, lm.tokenizer, []) == []


def test_answer_questions_cuts_at_the_first_newline(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def fake(model: Any, tokenizer: Any, prompts: list[str], **kwargs: Any) -> list[Sample]:
        seen.update(kwargs, prompts=prompts)
        return [Sample(prompts[0], "  Otrar \nQuestion: next?", False), Sample(prompts[1], "\nBaltic", True)]

    monkeypatch.setattr(knowledge, "sample_continuations", fake)
    answers = answer_questions(None, None, ["Which town?", "Who?"], max_new_tokens=8, batch_size=4)  # type: ignore[arg-type]
    assert answers == ["Otrar", ""]
    assert seen["prompts"] == ["Question: Which town?\nAnswer:", "Question: Who?\nAnswer:"]
    assert (seen["temperature"], seen["max_new_tokens"], seen["batch_size"], seen["n_per_prompt"]) == (0.0, 8, 4, 1)


def test_no_context_accuracy_grades_the_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    passage = Passage("T", "C", [QA("Q1?", "Baltic Germans"), QA("Q2?", "Otrar"), QA("Q3?", "1758")])
    monkeypatch.setattr(knowledge, "answer_questions", lambda *a, **k: ["the baltic Germans.", "Otrar city", "1759"])
    assert no_context_accuracy(None, None, passage) == pytest.approx(1 / 3)  # type: ignore[arg-type]
    # F1: 1, 2/3 (P 1/2, R 1), 0
    assert no_context_accuracy(None, None, passage, metric="f1") == pytest.approx((1 + 2 / 3) / 3)  # type: ignore[arg-type]


def test_no_context_accuracy_on_the_tiny_model(lm: LoadedModel, passage: Passage) -> None:
    value = no_context_accuracy(lm.model, lm.tokenizer, passage, metric="f1", max_new_tokens=2)
    assert isinstance(value, float) and 0.0 <= value <= 1.0


def test_no_context_accuracy_rejects_bad_metrics(lm: LoadedModel, passage: Passage) -> None:
    with pytest.raises(ValueError, match="needs a judge"):
        no_context_accuracy(lm.model, lm.tokenizer, passage, metric="semantic")
    with pytest.raises(ValueError, match="unknown metric 'bleu'"):
        no_context_accuracy(lm.model, lm.tokenizer, passage, metric="bleu")  # type: ignore[arg-type]


def test_passage_chunks_fit_the_window_and_keep_every_sentence():
    from model.evaluation.knowledge import passage_chunks
    from model.decoding.loading import tiny_model

    tok = tiny_model().tokenizer
    text = " ".join(f"Sentence number {i} says something about topic {i}." for i in range(40))
    chunks = passage_chunks(tok, text, 120)  # a sentence is ~41 tokens for this tokenizer
    assert len(chunks) > 1
    assert all(len(tok(c, add_special_tokens=False)["input_ids"]) <= 120 for c in chunks)
    assert " ".join(chunks) == text  # nothing lost, order kept
    long_sentence = "word " * 100
    pieces = passage_chunks(tok, long_sentence.strip(), 16)
    assert all(len(tok(c, add_special_tokens=False)["input_ids"]) <= 16 for c in pieces)
    with pytest.raises(ValueError, match="max_tokens"):
        passage_chunks(tok, text, 0)


def test_select_passages_takes_a_range_and_refuses_one_beyond_the_file(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps([GOOD, {**GOOD, "title": "U"}, {**GOOD, "title": "V"}]))
    chosen = knowledge.select_passages(path, 2, offset=1)
    assert [(i, p.title) for i, p in chosen] == [(1, "U"), (2, "V")]
    with pytest.raises(DataError, match=r"p.json: holds 3 passages, but cmp.knowledge asks for n_passages 3 from offset 1"):
        knowledge.select_passages(path, 3, offset=1, field="cmp.knowledge")
    with pytest.raises(DataError, match="passages file not found"):
        knowledge.select_passages(tmp_path / "nope.json", 1)


# plain passages of the inbox: pieces to continue, and how well they are recalled


def test_passage_pairs_cut_each_piece_after_its_beginning_and_lose_no_word(lm: LoadedModel) -> None:
    from model.evaluation.knowledge import passage_pairs

    text = " ".join(f"Sentence number {i} says something about topic {i}." for i in range(12))
    pairs = passage_pairs(lm.tokenizer, text, 60)
    assert len(pairs) > 1
    assert all(p.split() and c.startswith(" ") and c.split() for p, c in pairs)
    assert " ".join(p + c for p, c in pairs).split() == text.split()  # every word, in order
    for p, c in pairs:  # the prompt is the piece's first quarter of words
        n = len((p + c).split())
        assert len(p.split()) == min(max(1, round(n * 0.25)), n - 1)
    assert passage_pairs(lm.tokenizer, "Alone.", 60) == []  # one word: nothing to continue
    with pytest.raises(ValueError, match="prefix_fraction"):
        passage_pairs(lm.tokenizer, text, 60, prefix_fraction=1.0)


def test_stream_pairs_keep_labelled_rows_as_template_pairs_and_cut_passages(lm: LoadedModel) -> None:
    from model.evaluation.knowledge import stream_pairs

    texts = ["wake me at six", "The mill burned in 1820. Its stones built the lighthouse on the cape.", "play a song"]
    labels = ["alarm", "", "music"]
    template = "Text: {text}\nIntent: {label}"
    pairs, origin = stream_pairs(lm.tokenizer, template, texts, labels, 64)
    assert pairs[0] == split_template(template, texts[0], "alarm") and pairs[-1] == split_template(template, texts[2], "music")
    assert origin[0] == 0 and origin[-1] == 2 and set(origin[1:-1]) == {1} and len(pairs) > 2
    assert " ".join(p + c for p, c in pairs[1:-1]).split() == texts[1].split()


def test_passage_recall_rises_when_the_passage_is_trained_and_is_none_without_words() -> None:
    from model.evaluation.knowledge import passage_pairs, passage_recall

    trained = tiny_model(seed=0)
    model, tok = trained.model, trained.tokenizer
    text = "The harbour of Vessa freezes every winter. Its fishermen then walk to the islands on the ice."
    before = passage_recall(model, tok, [text], max_length=64)
    pairs = passage_pairs(tok, text, 60)
    batch = encode(tok, [p for p, _ in pairs], [c for _, c in pairs], 64)
    _train(model, batch)
    assert passage_recall(model, tok, [text], max_length=64) > before + 0.5
    assert passage_recall(model, tok, ["Alone."], max_length=64) is None
