"""Long context into memory: facts hidden in a document far longer than the window (BABILong-style, issue #16).

The paper's third family of results (docs/design.md §5, "Long context into memory"): a model reads a long document in
wake, window by window, consolidates in sleep, and then answers questions about it with
no document in the prompt. This module builds the documents and asks the questions:

* :func:`load_babi` reads bAbI stories (qa1-qa3); each story gives one :class:`Item`: its
  last question, the story's sentences before it as the facts, and the task's answer
  vocabulary (every place the file answers) as the candidates.
* :func:`needle_items` makes multi-key needle-in-a-haystack items: several "key -> value"
  facts, one of them asked, the document's values as the candidates.
* :func:`load_distractors` reads the haystack's prose (SQuAD-format passages: their
  contexts, cut into sentences); :func:`build_document` fills a document of a requested
  length (tokens of the model's tokenizer) with it and hides the facts, in their order, at
  seeded sentence boundaries.
* :func:`answer` scores every candidate by log-likelihood after the question (with or
  without a context) and takes the best: a 135M model is measured fairly, with no
  generation to grade.

The methods that read a document (in-context, retrieval, LoRA, CMS, sleep) are in
:mod:`model.evaluation.long_context_methods`.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from model.data.stream import DataError
from model.memory.wake import score_candidates

#: The question prompt; ``context`` is empty (no document) or text followed by a blank line.
QUESTION_TEMPLATE = "{context}Question: {question}\nAnswer:"
#: The content-free prompt of PMI scoring: what a candidate's likelihood is measured against.
NULL_PROMPT = "Answer:"
#: Needle facts and questions (multi-key needle-in-a-haystack).
NEEDLE_FACT = "The secret number of the {key} is {value}."
NEEDLE_QUESTION = "What is the secret number of the {key}?"
NEEDLE_KEYS = ("red fox", "blue whale", "green parrot", "silver wolf", "golden eagle", "black bear", "white owl",
               "brown horse", "grey heron", "orange tiger", "purple crab", "yellow bee")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
#: The seed offset of the development split's needles (the test split's are drawn from the seed itself).
DEV_NEEDLE_SEED = 100_003


@dataclass(frozen=True)
class Item:
    """One question about facts that a document hides: ``answer`` is one of ``candidates``."""

    task: str  # qa1, qa2, qa3 or needle
    item_id: str  # stable name: "<file>:<first line>" or "needle:<seed>:<i>"
    facts: tuple[str, ...]
    question: str
    answer: str
    candidates: tuple[str, ...]


@dataclass
class Document:
    """A document of ``length`` tokens (about) that hides ``item``'s facts in distractor prose."""

    item: Item
    text: str
    length: int  # requested tokens
    n_tokens: int  # tokens of ``text``
    fact_tokens: list[int] = field(default_factory=list)  # token offset where each fact starts


def load_babi(path: str | Path, task: str | None = None) -> list[Item]:
    """One item per bAbI story in ``path``: its last question, every statement before it, the file's answers.

    A story with no question, a malformed line or a file with no stories is a DataError naming the file
    and line.
    """
    path = Path(path)
    task = task or path.name.split("_")[0]
    if not path.is_file():
        raise DataError(f"{path}: no such bAbI file")
    # (first line, statements, questions as (question, answer, statements before it))
    stories: list[tuple[int, list[str], list[tuple[str, str, int]]]] = []
    last_id = 0
    for lineno, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not raw.strip():
            continue
        head, _, rest = raw.partition(" ")
        if not head.isdigit() or not rest:
            raise DataError(f"{path}: line {lineno}: expected 'ID text', got {raw[:60]!r}")
        sid = int(head)
        if sid <= last_id or not stories:
            if stories and not stories[-1][2]:
                raise DataError(f"{path}: the story starting at line {stories[-1][0]} has no question")
            stories.append((lineno, [], []))
        last_id = sid
        if "\t" in rest or rest.strip().endswith("?"):
            parts = rest.split("\t")
            if len(parts) < 2 or not parts[1].strip():
                raise DataError(f"{path}: line {lineno}: a question line needs 'question<TAB>answer'")
            stories[-1][2].append((parts[0].strip(), parts[1].strip(), len(stories[-1][1])))
        else:
            stories[-1][1].append(rest.strip())
    if not stories:
        raise DataError(f"{path}: no stories")
    if not stories[-1][2]:
        raise DataError(f"{path}: the story starting at line {stories[-1][0]} has no question")
    vocabulary = tuple(sorted({a for _, _, qs in stories for _, a, _ in qs}))
    items = []
    for first, statements, questions in stories:
        question, answer, before = questions[-1]
        items.append(Item(task, f"{path.name}:{first}", tuple(statements[:before]), question, answer, vocabulary))
    return items


def needle_items(n: int, n_keys: int, seed: int) -> list[Item]:
    """``n`` multi-key needle items: ``n_keys`` facts "the secret number of the <key> is <4 digits>", one asked."""
    if not 1 <= n_keys <= len(NEEDLE_KEYS):
        raise ValueError(f"n_keys must be in [1, {len(NEEDLE_KEYS)}], got {n_keys}")
    rng = random.Random(seed)
    items = []
    for i in range(n):
        keys = rng.sample(NEEDLE_KEYS, n_keys)
        values = [str(v) for v in rng.sample(range(1000, 10000), n_keys)]
        asked = rng.randrange(n_keys)
        facts = tuple(NEEDLE_FACT.format(key=k, value=v) for k, v in zip(keys, values))
        items.append(Item("needle", f"needle:{seed}:{i}", facts, NEEDLE_QUESTION.format(key=keys[asked]),
                          values[asked], tuple(values)))
    return items


def load_distractors(path: str | Path) -> list[str]:
    """Sentences of the distractor prose, in file order: a ``.txt`` file, or the passages' contexts of a
    SQuAD-format file (``model.evaluation.knowledge.load_passages``'s format). A missing file or one with no text is a
    DataError naming the file."""
    from model.evaluation.knowledge import load_passages

    path = Path(path)
    if path.suffix == ".txt":
        if not path.is_file():
            raise DataError(f"{path}: distractor file not found")
        texts = [path.read_text(encoding="utf-8")]
    else:
        texts = [p.context for p in load_passages(path)]
    sentences = [s for t in texts for s in SENTENCE_END.split(t.strip()) if s.strip()]
    if not sentences:
        raise DataError(f"{path}: the distractor source is empty")
    return sentences


def count_tokens(tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def build_document(
    tokenizer: PreTrainedTokenizerBase, item: Item, distractors: Sequence[str], length: int, seed: int,
    where: str = "long_context",
) -> Document:
    """A document of about ``length`` tokens: distractor sentences from a seeded start (cycling through
    ``distractors``), with ``item``'s facts, in order, at seeded sentence boundaries.

    The prose stops at the last sentence that fits, so the document has at most ``length`` tokens and
    at least ``length`` minus one distractor sentence. A length the facts do not fit in is a DataError.
    """
    if not distractors:
        raise DataError(f"{where}: the distractor source is empty")
    fact_lens = [count_tokens(tokenizer, " " + f) for f in item.facts]
    need = sum(fact_lens)
    if need >= length:
        raise DataError(f"{where}: length {length} tokens is shorter than the facts of {item.item_id} "
                        f"({need} tokens): ask for a longer document or a shorter story")
    rng = random.Random(f"{seed}:{item.item_id}:{length}")
    start = rng.randrange(len(distractors))
    prose: list[tuple[str, int]] = []  # (sentence, its tokens after a space)
    budget = length - need
    i = start
    while True:  # every sentence has a token, so the budget runs out
        s = distractors[i % len(distractors)]
        n = count_tokens(tokenizer, " " + s)
        if n > budget:
            break
        prose.append((s, n))
        budget -= n
        i += 1
    slots = sorted(rng.choices(range(len(prose) + 1), k=len(item.facts)))  # boundaries, facts in order
    parts: list[str] = []
    offsets: list[int] = []  # token offset of each fact (parts joined with single spaces, counted as above)
    pos = k = 0
    for b in range(len(prose) + 1):
        while k < len(slots) and slots[k] == b:
            offsets.append(pos)
            parts.append(item.facts[k])
            pos += fact_lens[k]
            k += 1
        if b < len(prose):
            parts.append(prose[b][0])
            pos += prose[b][1]
    text = " ".join(parts)
    return Document(item, text, length, count_tokens(tokenizer, text), offsets)


def question_prompt(question: str, context: str = "") -> str:
    """The prompt a question is asked with: after ``context`` (and a blank line) when there is one."""
    return QUESTION_TEMPLATE.format(context=f"{context.strip()}\n\n" if context.strip() else "", question=question)


def answer(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], candidates: Sequence[str],
    max_length: int, scoring: str = "pmi", batch_size: int = 16,
) -> list[int]:
    """Index of the best candidate (" <candidate>" + EOS) after each prompt.

    ``loglik``: the highest summed log-likelihood. ``pmi`` (domain-conditional PMI): that log-likelihood
    minus the candidate's after :data:`NULL_PROMPT` under the same model, so a model's standing preference
    for one answer (SmolLM2-135M says "bathroom" to most bAbI questions) does not count as recall; only what
    the question and context add does.
    """
    if scoring not in ("pmi", "loglik"):
        raise ValueError(f"scoring must be 'pmi' or 'loglik', got {scoring!r}")
    cands = [" " + c for c in candidates]
    scores = score_candidates(model, tokenizer, prompts, cands, batch_size, max_length)  # (P, C)
    if scoring == "pmi":
        scores = scores - score_candidates(model, tokenizer, [NULL_PROMPT], cands, batch_size, max_length)
    return scores.argmax(dim=1).tolist()


def tail_context(tokenizer: PreTrainedTokenizerBase, text: str, n_tokens: int) -> str:
    """The last ``n_tokens`` tokens of ``text`` (from a sentence start where one is in them)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= n_tokens:
        return text
    tail = tokenizer.decode(ids[-n_tokens:])
    cut = SENTENCE_END.search(tail)
    return tail[cut.end():] if cut and cut.end() < len(tail) else tail


__all__ = ["DEV_NEEDLE_SEED", "Document", "Item", "NEEDLE_KEYS", "NULL_PROMPT", "QUESTION_TEMPLATE", "answer",
           "build_document", "count_tokens", "load_babi", "load_distractors", "needle_items", "question_prompt",
           "tail_context"]
