"""SQuAD passages as knowledge-incorporation tasks (C, tau) for dreaming (docs/design.md §3, §5).

C is a passage; tau is how well the model answers the passage's questions *without*
the passage in its prompt, measured two ways:

* :func:`answer_loglik`: mean log-probability per gold-answer token given the question
  alone. Continuous, so it moves even when greedy answers do not; a cheap tau for
  scoring dreams.
* :func:`no_context_accuracy`: greedy answers graded by :mod:`model.evaluation.grading`
  (exact match, token F1 or semantic match); the tau that is reported.

A question is written with a template such as ``"Question: {question}\\nAnswer:"``
(the prompt) and its answer as ``" " + answer`` (the completion), so the same pair
trains the answer with :func:`model.memory.wake.encode` and scores it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from model.data.stream import PASSAGE_LABEL, DataError
from model.decoding.sampling import sample_continuations
from model.evaluation.grading import METRICS, Metric, accuracy, grade
from model.memory.wake import completion_logprobs, encode, split_template

if TYPE_CHECKING:
    from model.sleep.rewards import SemanticJudge

QA_TEMPLATE = "Question: {question}\nAnswer:"


@dataclass(frozen=True)
class QA:
    """One question about a passage and its single reference answer."""

    question: str
    answer: str


@dataclass
class Passage:
    """A passage C and the questions that measure whether the model knows it.

    ``squad_val_index`` is the passage's position in SEAL's ``squad_val.json`` when the
    file records it (None for the SQuAD-train passages).
    """

    title: str
    context: str
    questions: list[QA] = field(default_factory=list)
    squad_val_index: int | None = None


def load_passages(path: str | Path) -> list[Passage]:
    """Read a JSON list of ``{"title", "context", "questions": [{"question", "answer"}]}`` passages.

    Strings are stripped. Malformed input raises DataError naming the file, the
    passage index and the field.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: passages file not found")
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(obj, list):
        raise DataError(f"{path}: expected a JSON list of passages, got {type(obj).__name__}")
    if not obj:
        raise DataError(f"{path}: the list of passages is empty")
    return [_passage(path, i, rec) for i, rec in enumerate(obj)]


def select_passages(path: str | Path, n_passages: int, offset: int = 0, field: str = "knowledge") -> list[tuple[int, Passage]]:
    """(index, passage) for passages ``offset .. offset + n_passages - 1`` of ``path``.

    A missing or malformed file, or a range beyond the file, raises DataError naming the
    file and ``field`` (the params field that asked for the range).
    """
    if n_passages < 1 or offset < 0:
        raise ValueError(f"{field}: need n_passages >= 1 and offset >= 0, got {n_passages} and {offset}")
    passages = load_passages(path)
    end = offset + n_passages
    if end > len(passages):
        raise DataError(f"{path}: holds {len(passages)} passages, but {field} asks for n_passages {n_passages} "
                        f"from offset {offset} (passages {offset}..{end - 1})")
    return [(i, passages[i]) for i in range(offset, end)]


def _passage(path: Path, i: int, rec: Any) -> Passage:
    """Validate passage ``i`` of ``path`` and build it."""
    where = f"{path}: passage {i}"
    if not isinstance(rec, dict):
        raise DataError(f"{where} must be an object, got {_describe(rec)}")
    title = _string(rec, "title", where, allow_empty=True)
    context = _string(rec, "context", where)
    questions = rec.get("questions")
    if not isinstance(questions, list):
        raise DataError(
            f"{where}: field 'questions' must be a list of {{question, answer}} objects, got {_describe(questions)}"
        )
    if not questions:
        raise DataError(f"{where} has no questions (field 'questions' is an empty list)")
    qas: list[QA] = []
    for j, qa in enumerate(questions):
        at = f"{where}: questions[{j}]"
        if not isinstance(qa, dict):
            raise DataError(f"{at} must be an object with fields 'question' and 'answer', got {_describe(qa)}")
        qas.append(QA(question=_string(qa, "question", at), answer=_string(qa, "answer", at)))
    index = rec.get("squad_val_index")
    if index is not None and (isinstance(index, bool) or not isinstance(index, int) or index < 0):
        raise DataError(f"{where}: field 'squad_val_index' must be a non-negative integer, got {_describe(index)}")
    return Passage(title=title, context=context, questions=qas, squad_val_index=index)


def _string(rec: dict[str, Any], name: str, where: str, allow_empty: bool = False) -> str:
    """Field ``name`` of ``rec`` as a stripped string; DataError if absent, not a string or empty."""
    value = rec.get(name)
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} must be a string, got {_describe(value)}")
    value = value.strip()
    if not value and not allow_empty:
        raise DataError(f"{where}: field {name!r} is empty")
    return value


def _describe(value: Any) -> str:
    """Short description of a bad field value for error messages."""
    if value is None:
        return "a missing value"
    return f"{type(value).__name__} {value!r}"[:80]


def qa_prompt(question: str, template: str = QA_TEMPLATE) -> str:
    """The prompt that asks ``question`` without the passage: ``template`` with ``{question}`` filled.

    Only ``{question}`` is substituted, so other braces in the template stay as written.
    """
    if "{question}" not in template:
        raise ValueError(f"QA template {template!r} has no '{{question}}' placeholder")
    return template.replace("{question}", question.strip())


def answer_completion(answer: str) -> str:
    """How a gold answer follows the prompt: one space, then the answer."""
    return " " + answer.strip()


@torch.inference_mode()
def answer_loglik(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    passage: Passage,
    template: str = QA_TEMPLATE,
    batch_size: int = 16,
    max_length: int = 256,
) -> float:
    """Mean log p per gold-answer token (the answer's tokens and EOS) given each question alone.

    Pooled over the passage's questions: sum of log-probabilities / number of tokens,
    so long answers weigh by their length. Always <= 0; higher means the model knows more.
    """
    if not passage.questions:
        raise ValueError(f"passage {passage.title!r} has no questions to score")
    prompts = [qa_prompt(qa.question, template) for qa in passage.questions]
    completions = [answer_completion(qa.answer) for qa in passage.questions]
    return pairs_loglik(model, tokenizer, prompts, completions, batch_size, max_length, f"passage {passage.title!r}")


def pairs_loglik(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    completions: Sequence[str],
    batch_size: int = 16,
    max_length: int = 256,
    what: str = "completions",
) -> float:
    """Mean log p per completion token (its tokens and EOS) given its prompt, pooled over the pairs.

    Sum of log-probabilities / number of tokens, so long completions weigh by their length.
    Always <= 0; higher means the model knows more. ``what`` names the pairs in errors.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, len(prompts), batch_size):
            batch = encode(tokenizer, prompts[start : start + batch_size], completions[start : start + batch_size], max_length)
            logp, n = completion_logprobs(model, batch)  # (B,), (B,)
            total += float(logp.sum())
            count += int(n.sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError(f"no {what} to score")
    mean = total / count
    if not math.isfinite(mean):
        raise FloatingPointError(f"non-finite log-likelihood {mean} of {what}")
    return mean


def passage_pairs(tokenizer: PreTrainedTokenizerBase, text: str, max_tokens: int,
                  prefix_fraction: float = 0.25) -> list[tuple[str, str]]:
    """A plain passage as (prompt, completion) pairs to learn by heart.

    The passage is cut into pieces of at most ``max_tokens`` tokens (:func:`passage_chunks`).
    Each piece is split after its first ``prefix_fraction`` of words: at least one word in
    the prompt and at least one left for the completion. The model learns to continue a
    piece from its beginning. That prefix is also the prompt a sleep keeps, so consolidation
    distils the same recall. A piece of one word has nothing to continue and is left out.
    """
    if not 0 < prefix_fraction < 1:
        raise ValueError(f"prefix_fraction must be in (0, 1), got {prefix_fraction}")
    out = []
    for piece in passage_chunks(tokenizer, text, max_tokens):
        words = piece.split()
        if len(words) < 2:
            continue
        k = min(max(1, round(len(words) * prefix_fraction)), len(words) - 1)
        out.append((" ".join(words[:k]), " " + " ".join(words[k:])))
    return out


def passage_room(max_length: int) -> int:
    """Tokens a passage piece may have so that prompt, completion and EOS fit a window of ``max_length``
    (the words' separate tokenisation and the EOS take a few more)."""
    return max(1, max_length - 4)


def stream_pairs(tokenizer: PreTrainedTokenizerBase, template: str, texts: Sequence[str], labels: Sequence[str],
                 max_length: int) -> tuple[list[tuple[str, str]], list[int]]:
    """What a wake learns from a period's train rows, in row order: a labelled row is its template's
    (prompt, label) pair (:func:`model.memory.wake.split_template`); a passage row (label :data:`PASSAGE_LABEL`) is
    its pieces (:func:`passage_pairs`). Returns the pairs and, for each, the index of its row."""
    pairs: list[tuple[str, str]] = []
    origin: list[int] = []
    for i, (text, label) in enumerate(zip(texts, labels)):
        more = (passage_pairs(tokenizer, text, passage_room(max_length)) if label == PASSAGE_LABEL
                else [split_template(template, text, label)])
        pairs += more
        origin += [i] * len(more)
    return pairs, origin


def passage_recall(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str],
                   batch_size: int = 16, max_length: int = 256) -> float | None:
    """How well the model recalls plain passages: mean log p per token of each piece's rest given its
    beginning, the pieces a wake of window ``max_length`` learns (:func:`passage_pairs`, :func:`pairs_loglik`);
    None when no passage has two words."""
    pairs = [pair for text in texts for pair in passage_pairs(tokenizer, text, passage_room(max_length))]
    if not pairs:
        return None
    return pairs_loglik(model, tokenizer, [p for p, _ in pairs], [c for _, c in pairs], batch_size, max_length,
                        "passage pieces")


def answer_questions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[str],
    template: str = QA_TEMPLATE,
    max_new_tokens: int = 16,
    batch_size: int = 16,
) -> list[str]:
    """Greedy answers to the questions without the passage: the text up to the first newline, stripped."""
    if not questions:
        return []
    prompts = [qa_prompt(q, template) for q in questions]
    samples = sample_continuations(
        model, tokenizer, prompts, n_per_prompt=1, max_new_tokens=max_new_tokens, temperature=0.0, batch_size=batch_size
    )
    return [s.text.split("\n", 1)[0].strip() for s in samples]


def no_context_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    passage: Passage,
    template: str = QA_TEMPLATE,
    judge: SemanticJudge | None = None,
    metric: Metric = "em",
    max_new_tokens: int = 16,
    batch_size: int = 16,
) -> float:
    """Fraction of the passage's questions answered correctly without it (see :mod:`model.evaluation.grading`).

    ``metric`` "semantic" needs ``judge``; "f1" gives the mean token F1.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    if metric == "semantic" and judge is None:
        raise ValueError("metric 'semantic' needs a judge (SemanticJudge.load(threshold))")
    if not passage.questions:
        raise ValueError(f"passage {passage.title!r} has no questions to answer")
    preds = answer_questions(
        model, tokenizer, [qa.question for qa in passage.questions], template, max_new_tokens, batch_size
    )
    results = grade(preds, [qa.answer for qa in passage.questions], judge=judge if metric == "semantic" else None)
    return accuracy(results, metric)


def passage_sentences(text: str) -> list[str]:
    """The passage's sentences: split after ., ! or ? followed by white space (empty pieces dropped)."""
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


def passage_chunks(tokenizer: PreTrainedTokenizerBase, text: str, max_tokens: int) -> list[str]:
    """Split ``text`` into consecutive pieces of at most ``max_tokens`` tokens, at sentence ends where possible.

    For training on a passage longer than the model's window (continued pretraining in
    pieces). A single sentence longer than ``max_tokens`` is cut at token boundaries.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    sentences = passage_sentences(text)
    chunks: list[str] = []
    current: list[str] = []
    for sentence in sentences:
        ids = tokenizer(sentence, add_special_tokens=False)["input_ids"]
        if len(ids) > max_tokens:  # one over-long sentence: cut it by tokens
            if current:
                chunks.append(" ".join(current))
                current = []
            chunks += [tokenizer.decode(ids[i : i + max_tokens]) for i in range(0, len(ids), max_tokens)]
            continue
        candidate = " ".join([*current, sentence])
        if current and len(tokenizer(candidate, add_special_tokens=False)["input_ids"]) > max_tokens:
            chunks.append(" ".join(current))
            current = [sentence]
        else:
            current.append(sentence)
    if current:
        chunks.append(" ".join(current))
    return chunks
