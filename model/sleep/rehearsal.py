"""Rehearsal inside sleep: dreams about every task seen so far, with no raw past data.

The paper's sleep "distils short-term memories into long-term knowledge with replay",
and its dreams "rehearse new knowledge and refine existing capabilities". Here the
replay is dreamed, never stored: for each label of an earlier task the model itself
writes example inputs, from the label's *name* alone, with the fast level masked (the
old experts are what remembers those tasks) and random experts on (dream mode). Each
dreamed input x gets its label as the completion, and joins consolidation's data D with
the *old* model as its teacher: the model with the fast level masked and the new
expert hidden, i.e. the state that still answers old tasks as the earlier sleeps left
it. Knowledge Seeding allows several teachers; this is the second one. The new slow
expert thus learns the new task on the current period's prompts while matching the old
behaviour on dreamed old-task inputs, instead of copying the fast level's override onto
every input.

Every dream passes the same kind of checks as the dream stage's gate before it is used
(:func:`check_rehearsal_dreams`): long enough, not a near duplicate of an earlier dream of
the same label, not merely the label name repeated.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Sequence
from dataclasses import dataclass

from rapidfuzz import fuzz
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from model.config import RehearsalConfig, SamplingConfig
from model.decoding.sampling import sample_continuations
from model.errors import UserError
from model.memory.cms import ContinuumMemory
from model.memory.wake import label_text, split_template


class RehearsalError(UserError, ValueError):
    """Rehearsal cannot run: an earlier task has no label names to dream about."""


@dataclass(frozen=True)
class RehearsalDream:
    """One dreamed input of an earlier task, with the checks it passed or failed."""

    label: str
    task: int
    text: str
    passed: bool
    failed: tuple[str, ...]

    def pair(self, template: str) -> tuple[str, str]:
        """(prompt, completion) as wake writes an example."""
        return split_template(template, self.text, self.label)


def rehearsal_prompt(tokenizer: PreTrainedTokenizerBase, label: str, cfg: RehearsalConfig,
                     shots: Sequence[tuple[str, str]] = ()) -> str:
    """The prompt an input of ``label`` is dreamt after: the shots (labelled examples of the current
    period, which set the style of a real input), then the label; chat-wrapped when asked."""
    examples = "".join(cfg.shot.replace("{label}", label_text(y)).replace("{text}", x) for x, y in shots)
    text = cfg.prompt.replace("{examples}", examples).replace("{label}", label_text(label))
    if cfg.chat and tokenizer.chat_template:
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return text


def _clean(text: str) -> str:
    """First non-empty line, without quotes or a leading list marker."""
    for line in text.strip().splitlines():
        line = line.strip().strip('"').strip("'").lstrip("-*0123456789. ").strip()
        if line:
            return line
    return ""


def check_rehearsal_dreams(texts: Sequence[str], labels: Sequence[str], cfg: RehearsalConfig) -> list[tuple[str, ...]]:
    """The checks each dream fails (empty tuple: passed), in order of the input.

    ``too_short``: fewer than ``min_chars`` characters. ``near_duplicate``: rapidfuzz ratio >=
    ``near_duplicate_threshold`` with an earlier dream of the same label. ``label_only``: the
    text is (nearly) the label name itself (ratio >= ``near_duplicate_threshold``), which would
    teach the label token to follow itself rather than the task.
    """
    if len(texts) != len(labels):
        raise ValueError(f"{len(texts)} dreams but {len(labels)} labels")
    seen: dict[str, list[str]] = {}
    out = []
    for text, label in zip(texts, labels):
        failed = []
        if len(text) < cfg.min_chars:
            failed.append("too_short")
        earlier = seen.setdefault(label, [])
        if any(fuzz.ratio(text, e) >= cfg.near_duplicate_threshold for e in earlier):
            failed.append("near_duplicate")
        if fuzz.ratio(text.lower(), label_text(label).lower()) >= cfg.near_duplicate_threshold:
            failed.append("label_only")
        earlier.append(text)
        out.append(tuple(failed))
    return out


def dream_task_inputs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    cms: ContinuumMemory,
    old_labels: dict[int, Sequence[str]],
    masked_levels: Sequence[int],
    cfg: RehearsalConfig,
    seed: int,
    sampling: SamplingConfig | None = None,
    examples: Sequence[tuple[str, str]] = (),
) -> list[RehearsalDream]:
    """Dream ``cfg.per_label`` inputs for every label of the given tasks (``{task: labels}``).

    Sampled with what ``masked_levels`` learned since their last consolidation masked (the fast level, for
    earlier tasks: the old experts, kept-dream ones included, remember them) and, with ``cfg.random_expert``,
    in dream mode (random experts on). Uses
    nothing but the label names and the model's own state. Raises RehearsalError when a task
    lists no label names. ``examples`` are (text, label) pairs of the *current* period (the
    wake's buffer): ``cfg.shots`` of them, drawn per prompt, stand before the label so the dream
    reads like a real input of the stream; no earlier period's example is ever shown.
    """
    empty = [t for t, labs in old_labels.items() if not labs or any(not str(x).strip() for x in labs)]
    if empty:
        raise RehearsalError(f"rehearsal: task(s) {empty} have no label names to dream about "
                             "(the stream's plan must name every task's labels)")
    pairs = [(t, lab) for t, labs in sorted(old_labels.items()) for lab in labs]
    if not pairs:
        return []
    sampling = sampling or SamplingConfig()
    rng = random.Random(seed)
    k = min(cfg.shots, len(examples))
    prompts = [rehearsal_prompt(tokenizer, lab, cfg, rng.sample(list(examples), k)) for _, lab in pairs]
    routing = cms.random_expert_routing(seed) if cfg.random_expert else contextlib.nullcontext()
    with cms.since_sleep_masked(list(masked_levels)), routing:
        samples = sample_continuations(
            model, tokenizer, prompts, cfg.per_label, cfg.max_new_tokens, cfg.temperature, cfg.top_p, seed,
            batch_size=sampling.batch_size, dtype=sampling.compute_dtype,
        )
    texts = [_clean(s.text) for s in samples]
    labels = [lab for _, lab in pairs for _ in range(cfg.per_label)]
    tasks = [t for t, _ in pairs for _ in range(cfg.per_label)]
    failed = check_rehearsal_dreams(texts, labels, cfg)
    return [RehearsalDream(lab, t, x, not f, f) for lab, t, x, f in zip(labels, tasks, texts, failed)]


__all__ = [
    "RehearsalDream",
    "RehearsalError",
    "check_rehearsal_dreams",
    "dream_task_inputs",
    "rehearsal_prompt",
]
