"""Sleep, stage 1: consolidation by Knowledge Seeding (paper 3.2-3.3, docs/design.md §2).

Level ``src = l-1`` is distilled into a freshly unlocked expert of level ``dst = l``:

1. *Expand*: unlock a free slot of ``dst`` (B = 0, so the model is unchanged).
2. *Teacher / student in one module*: the teacher is the model as it is with the new
   expert hidden; the student masks level ``src`` and shows the new expert. Only the
   new expert (A, B and its router row, in every CMS layer) receives gradients. Below
   the first CMS layer both compute the same thing, so that prefix runs once, without
   gradient, and feeds both suffixes.
3. *Data D*: teacher samples from a small buffer of wake prompts.
4. *GKD*: (1-lambda) E_{(x,y)~D} F(T||S)(y|x) + lambda E_x E_{y~S} F(T||S)(y|x),
   no gradient through sampling.
5. *Learning to Imitate*: cut a teacher sequence at a random token, let the student
   continue it G times, reward r = gamma*r_sem + (1-gamma)*r_abs (eq. 3-4), policy
   gradient with group-normalised advantages.
6. *Objective*: L_KS = alpha * distillation - (1-alpha) * E[r].
7. *Reset*: level ``src`` is zeroed and masked (synaptic pruning).

Without expansion (``cfg.expand`` false, an ablation) step 1 is skipped: the newest
active expert of ``dst`` is trained in place, and the teacher sees a frozen copy of
its weights as they were when the sleep began.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from model.config import ConsolidationConfig, LevelConfig, SamplingConfig
from model.decoding.forward import Batch, completion_logits, prefix_hidden, suffix_hidden
from model.decoding.sampling import PromptTrunk, SampleGroup, sample_continuations, sample_groups
from model.errors import UserError
from model.memory.cms import CMSError, ContinuumMemory
from model.memory.merging import MergeRecord, merge_pair
from model.memory.routing import captured_inputs, router_logits, routing_loss
from model.memory.wake import NonFiniteLossError, encode, grouped_logprobs
from model.sleep.losses import distillation_loss
from model.sleep.rewards import SemanticJudge, group_advantages, imitation_reward

# A distillation batch's rows hold up to this many tokens (at least wake.max_length): 8 CLINC prompts with their
# 12-token completions (about 25 tokens each) pack into one row of about 200 tokens, where rows of 64 would be 4 rows
# of 63 slots, a fifth of them padding that the frozen prefix, both suffixes and the backward pass run on.
DISTILLATION_ROW_TOKENS = 512


def encode_distillation(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], completions: Sequence[str],
                         max_length: int) -> Batch:
    """``encode`` with rows of :data:`DISTILLATION_ROW_TOKENS` (or ``max_length``, if longer)."""
    return encode(tokenizer, prompts, completions, max_length, max(DISTILLATION_ROW_TOKENS, max_length))


class EmptyPromptBufferError(UserError, ValueError):
    """Sleep has nothing to replay: the prompt buffer is empty."""


def due_consolidations(step_before: int, step_after: int, levels: Sequence[LevelConfig]) -> list[tuple[int, int]]:
    """Pairs (l-1, l) whose schedule fired in wake steps (step_before, step_after].

    Level l-1 is consolidated into level l at every multiple of C(l). Several
    multiples crossed in one wake period give one consolidation (the fast level holds
    the same knowledge at each of them). The slowest pair comes first, so a level
    hands its knowledge up before it receives the faster level's.
    """
    pairs = []
    for dst in range(len(levels) - 1, 0, -1):
        c = levels[dst].chunk_size
        if step_after // c > step_before // c:
            pairs.append((dst - 1, dst))
    return pairs


class SplitForward:
    """Teacher and student share the layers below the first CMS layer: run them once per batch."""

    def __init__(self, model: PreTrainedModel, cms: ContinuumMemory) -> None:
        self.model = model
        self.start = cms.layer_ids[0]

    def prefix(self, batch: Batch) -> torch.Tensor:
        """Hidden states (R, T, d) below the first CMS layer, without gradient."""
        return prefix_hidden(self.model, batch.input_ids, batch.position_ids, self.start)

    def completion_logits(self, prefix: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Logits (M, V) at the completion positions, in the current CMS view."""
        return completion_logits(self.model, suffix_hidden(self.model, prefix, batch.position_ids, self.start), batch)


class PrefixCache:
    """What a sleep computes again and again for a fixed list of (prompt, completion) pairs, computed the
    first time a batch draws the pair: its prefix (hidden states below the first CMS layer) and its
    teacher's logits at the completion positions.

    The data D, the rehearsal dreams and a fold's anchors are drawn from fixed lists step after step (a
    rehearsal dream about 8 times in a 40-step sleep), and neither what they are computed by changes during
    a consolidation: nothing below the CMS layers learns, and a teacher never sees the expert that learns
    (it is hidden, or a frozen copy stands in for it). :meth:`batch` packs the drawn pairs as ``encode``
    does and places each one's cached rows where it landed; the pad positions get zeros (their own segment:
    no real token attends to them, and nothing is read at them). :meth:`teacher_logits` does the same for
    the logits of ``teacher`` (a context manager factory: the view of the model that teaches these pairs).
    Both equal what :class:`SplitForward` computes on the same batch up to the float rounding of another
    packing. The logits cost memory: (completion tokens + 1) x vocabulary floats a pair.
    """

    def __init__(self, split: SplitForward, tokenizer: PreTrainedTokenizerBase, pairs: Sequence[tuple[str, str]],
                 max_length: int, all_positions: bool = False,
                 teacher: Callable[[], contextlib.AbstractContextManager] | None = None) -> None:
        self.split, self.tokenizer, self.pairs = split, tokenizer, list(pairs)
        self.max_length, self.all_positions, self.teacher = max_length, all_positions, teacher
        self._hidden: list[torch.Tensor | None] = [None] * len(self.pairs)  # (n_tokens, d) of each pair
        self._logits: list[torch.Tensor | None] = [None] * len(self.pairs)  # (n_predicted, V) of each pair

    def _encode(self, idx: Sequence[int]) -> Batch:
        batch = encode_distillation(self.tokenizer, [self.pairs[i][0] for i in idx],
                                     [self.pairs[i][1] for i in idx], self.max_length)
        return (every_position(batch) if self.all_positions else batch).to(self.split.model.device)

    def batch(self, idx: Sequence[int]) -> tuple[Batch, torch.Tensor]:
        """The batch of pairs ``idx`` (distinct indices) and its prefix (R, T, d)."""
        missing = [i for i in dict.fromkeys(idx) if self._hidden[i] is None]
        if missing:
            fresh = self._encode(missing)
            with torch.no_grad():
                h = self.split.prefix(fresh)
            for k, i in enumerate(missing):
                self._hidden[i] = h[fresh.segment == k]
        batch = self._encode(idx)
        first = self._hidden[idx[0]]
        state = first.new_zeros(*batch.input_ids.shape, first.shape[-1])
        for k, i in enumerate(idx):
            state[batch.segment == k] = self._hidden[i]
        return batch, state

    def teacher_logits(self, idx: Sequence[int], batch: Batch) -> torch.Tensor:
        """The teacher's logits (M, V) at the completion positions of ``batch`` (from :meth:`batch` of ``idx``)."""
        if self.teacher is None:
            raise ValueError("this PrefixCache has no teacher: give teacher= to cache its logits")
        missing = [i for i in dict.fromkeys(idx) if self._logits[i] is None]
        if missing:
            fresh, state = self.batch(missing)
            with torch.no_grad(), self.teacher():
                out = self.split.completion_logits(state, fresh)
            owner = _predicting(fresh)
            for k, i in enumerate(missing):
                self._logits[i] = out[owner == k]
        owner = _predicting(batch)
        first = self._logits[idx[0]]
        out = first.new_empty(len(owner), first.shape[-1])
        for k, i in enumerate(idx):
            out[owner == k] = self._logits[i]
        return out


def held_prefix(trunk: PromptTrunk, model: PreTrainedModel, batch: Batch) -> torch.Tensor | None:
    """:meth:`SplitForward.prefix` of ``batch`` (R, T, d) from what ``trunk`` holds of its prompts (the layers
    below the first CMS layer of the prompts a sampler has just continued), computing the completions' part only;
    None unless it holds every example's prompt (as ``encode`` cut it). The same up to float rounding."""
    where = [batch.segment == k for k in range(batch.n_examples)]  # each example's slots, in order
    ids = [batch.input_ids[w].tolist() for w in where]
    starts = [int(batch.completion_mask[w].nonzero()[0]) for w in where]  # its first completion token
    hidden = trunk.extend(model, [x[:s] for x, s in zip(ids, starts)], [x[s:] for x, s in zip(ids, starts)])
    if hidden is None:
        return None
    state = hidden[0].new_zeros(*batch.input_ids.shape, hidden[0].shape[-1])  # pad slots: zeros, as PrefixCache
    for w, h in zip(where, hidden):
        state[w] = h
    return state


def _predicting(batch: Batch) -> torch.Tensor:
    """For each row of :func:`completion_logits`' output (M,), the example whose token it predicts."""
    return batch.segment[:, 1:][batch.completion_mask[:, 1:]]


@dataclass
class StepRecord:
    step: int
    loss: float
    distillation: float
    reward: float
    on_policy: bool


@dataclass
class ConsolidationResult:
    src: int
    dst: int
    slot: int
    merged: MergeRecord | None = None  # the merge that freed a slot of a full level first
    seeded_from: int | None = None  # cfg.init 'copy': the slot of level src the new expert started as
    steps: list[StepRecord] = field(default_factory=list)
    rehearsal_steps: list[StepRecord] = field(default_factory=list)  # cfg.rehearsal.steps: the old tasks alone
    samples: list[dict] = field(default_factory=list)  # the sleep's dreams table rows


def _cut(tokenizer: PreTrainedTokenizerBase, prompt: str, text: str, rng: random.Random) -> tuple[str, str]:
    """Cut a teacher sequence at a random completion token: (prompt + head, remaining tail)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    k = rng.randrange(len(ids)) if ids else 0
    return prompt + tokenizer.decode(ids[:k]), tokenizer.decode(ids[k:])


def seed_expert(cms: ContinuumMemory, src: int, dst: int, slot: int) -> int | None:
    """``consolidation.init: copy``: start the new expert ``slot`` of level ``dst`` as level ``src``'s expert
    that learned most (the largest sum over layers of ||B||_F; with one active expert, that one). Returns its
    slot, or None when level ``src`` has no active expert (the new expert keeps B = 0).

    Level ``src`` is masked in the student, and it fed level ``dst`` in the chain (eq. 1), so the copy sees
    the inputs its source saw: the student starts close to the teacher on this period's inputs, and
    distillation, with rehearsal, has only to correct it, not to learn the period again from nothing.
    """
    slots = [s for s in cms.active_slots(src) if s not in cms.kept_dream_slots(src)]
    if not slots:
        return None
    norms = {e: sum(float(bank.B[e].detach().norm()) for bank in cms.banks(src)) for e in slots}
    best = max(slots, key=lambda e: (norms[e], -e))
    cms.copy_expert((src, best), (dst, slot))
    return best


def consolidate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    cms: ContinuumMemory,
    src: int,
    dst: int,
    prompts: Sequence[str],
    cfg: ConsolidationConfig,
    max_length: int,
    judge: SemanticJudge | None,
    seed: int,
    origin: str,
    on_step: Callable[[StepRecord], None] | None = None,
    sampling: SamplingConfig | None = None,
    rehearsal: Sequence[tuple[str, str]] = (),
    freeze: bool = False,
    route_weight: float = 0.0,
    into: int | None = None,
    anchors: Sequence[tuple[str, str]] = (),
    anchor_weight: float = 1.0,
) -> ConsolidationResult:
    """Knowledge Seeding of level ``src`` into a new expert of level ``dst``; then free ``src`` (its kept-dream
    experts, ``dream.keep_dreams``, stay: they are part of the old model, in the student too).

    Mutates ``cms`` in memory only. Raises NonFiniteLossError on a NaN/inf loss and
    NonFiniteLogitsError on NaN logits while sampling (the caller must then discard the
    model rather than save it), NoFreeSlotError when
    ``dst`` is full, EmptyPromptBufferError without prompts. ``sampling`` sets the
    decoder's batch size and dtype for every sample drawn here (default: SamplingConfig()).

    ``rehearsal``: (prompt, completion) pairs of dreamed old-task inputs (model/sleep/rehearsal.py).
    They join D with a second teacher, the *old* model (level ``src`` masked, the new expert
    hidden), in a batch of ``cfg.rehearsal.batch_size`` beside every distillation batch, weighted
    by ``cfg.rehearsal.weight``; with ``route_weight`` > 0 the new expert's router also learns
    L_route (model/memory/routing.py): on for this period's prompts, off for the rehearsal dreams.
    ``freeze``: the new expert is read-only in later wakes.
    When ``dst`` is full and ``cfg.merge_when_full``, two of its consolidated experts are merged first
    (:func:`model.memory.merging.merge_pair`, the pair ``cfg.merge_pair`` picks), so a sleep always has a slot.
    ``into``: an active slot of ``dst`` to train in place (against a frozen copy of itself, as
    without expansion) instead of a new expert; how a sleep folds its dreams (:func:`fold_dreams`).
    ``anchors``: (prompt, text) pairs that the *teacher* (not the old model) keeps on every token, up to
    ``cfg.rehearsal.batch_size`` of them beside every distillation batch, weighted by ``anchor_weight``:
    a fold's promoted dreams, the text its fast level was trained on.
    """
    if not prompts:
        raise EmptyPromptBufferError("consolidation needs wake prompts, but the prompt buffer is empty")
    if not (0 <= src < cms.n_levels and 0 <= dst < cms.n_levels and dst == src + 1):
        raise CMSError(f"cannot consolidate level {src} into level {dst}: need 0 <= src, dst = src + 1 < {cms.n_levels}")
    if cfg.gamma > 0 and cfg.alpha < 1 and judge is None:
        raise ValueError("gamma > 0 needs the semantic reward model (judge)")
    rng = random.Random(seed)
    existing = cms.active_slots(dst)
    if into is not None:
        if into not in existing:
            raise CMSError(f"cannot train level {dst} slot {into} in place: it is not active (active: {existing})")
        existing = [into]
    expand = cfg.expand and into is None
    merged = None
    if (expand or not existing) and not cms.free_slots(dst) and cfg.merge_when_full:
        with cms.since_sleep_masked([src]):  # the slow level's inputs as the student will see them
            merged = merge_pair(model, tokenizer, cms, dst, [*prompts, *(p for p, _ in rehearsal)],
                                max_length, cfg.merge_steps, cfg.lr, seed, cfg.merge_pair, cfg.merge_in_view,
                                cfg.merge_start)
    seeded_from = None
    if expand or not existing:
        slot = cms.unlock(dst, origin=origin)
        if cfg.init == "copy":
            seeded_from = seed_expert(cms, src, dst, slot)
        new_params = cms.level_parameters(dst, [slot])
        teacher = lambda: cms.levels_masked([], hidden={dst: [slot]})  # noqa: E731
        old_teacher = lambda: cms.since_sleep_masked([src], hidden={dst: [slot]})  # noqa: E731
    else:  # no expansion: train the newest expert in place against a frozen copy of it
        slot = existing[-1]
        new_params = cms.level_parameters(dst, [slot])
        frozen = [p.detach().clone() for p in new_params]
        teacher = lambda: _weights_swapped(new_params, frozen)  # noqa: E731

        @contextlib.contextmanager
        def old_teacher() -> Iterator[None]:
            with _weights_swapped(new_params, frozen), cms.since_sleep_masked([src]):
                yield
    result = ConsolidationResult(src=src, dst=dst, slot=slot, merged=merged, seeded_from=seeded_from)
    student = lambda: cms.since_sleep_masked([src])  # noqa: E731
    split = SplitForward(model, cms)
    r_cache = PrefixCache(split, tokenizer, rehearsal, max_length, cfg.rehearsal.all_positions,
                          teacher=old_teacher) if rehearsal else None
    sampling = sampling or SamplingConfig()
    # Every sampling of this consolidation (D, then each on-policy step) prefills prompts of D: below the first CMS
    # layer, which never learns, their keys, values and hidden states are computed once.
    trunk = PromptTrunk(split.start) if split.start > 0 else None
    decode = {"batch_size": sampling.batch_size, "dtype": sampling.compute_dtype, "trunk": trunk}
    pair_of = lambda s: (s.prompt, s.text)  # noqa: E731

    def teacher_data() -> list:
        """D: the teacher's samples on this period's prompts (recorded in the dreams table)."""
        with teacher():
            data = sample_continuations(model, tokenizer, prompts, cfg.samples_per_prompt, cfg.max_new_tokens,
                                        cfg.temperature, cfg.top_p, seed, **decode)
        result.samples += _teacher_rows(data)
        return data

    if cfg.steps == 0:  # the copy alone (config: init copy, with expansion): no teacher data, nothing distilled
        if r_cache is not None and cfg.rehearsal.steps > 0:
            keep = None
            if cfg.rehearsal.anchor_current:  # the copy's answers on this period's prompts, kept beside
                data = teacher_data()
                keep = PrefixCache(split, tokenizer, [pair_of(s) for s in data], max_length, teacher=teacher)
            result.rehearsal_steps = rehearse_alone(model, cms, split, r_cache, new_params, student, cfg, rng,
                                                    on_step, keep=keep)
        return _release(cms, src, dst, slot, freeze, result)
    optimizer = torch.optim.AdamW(new_params, lr=cfg.lr, weight_decay=0.0)

    data = teacher_data()
    d_cache = PrefixCache(split, tokenizer, [pair_of(s) for s in data], max_length, teacher=teacher)
    a_cache = PrefixCache(split, tokenizer, anchors, max_length, all_positions=True, teacher=teacher) if anchors else None
    model.train()
    try:
        with cms.trainable_only(new_params):
            for step in range(1, cfg.steps + 1):
                # Every random draw of the step first, in a fixed order; then one decode for both sampling sites.
                idx = rng.sample(range(len(data)), min(cfg.batch_size, len(data)))
                pick = [data[i] for i in idx]
                on_policy = rng.random() < cfg.on_policy_fraction
                b_prompts = [s.prompt for s in pick]
                use_rehearsal = bool(rehearsal) and (cfg.rehearsal.weight > 0 or route_weight > 0)
                r_idx = _draw(rehearsal, rng, cfg.rehearsal.batch_size) if use_rehearsal else []
                a_idx = _draw(anchors, rng, cfg.rehearsal.batch_size) if anchors and anchor_weight > 0 else []
                cuts = _imitation_cuts(tokenizer, data, cfg, rng) if cfg.alpha < 1 else []
                groups = ([SampleGroup(b_prompts, 1, seed * 1_000_003 + step)] if on_policy else []) + (
                    [SampleGroup([p for p, _ in cuts], cfg.lti_group_size, seed * 2_000_003 + step)] if cuts else [])
                if groups:  # y ~ student(.|x); no gradient through sampling
                    with student():
                        drawn = sample_groups(model, tokenizer, groups, cfg.max_new_tokens, cfg.temperature, cfg.top_p,
                                              **decode)
                conts = drawn[-1] if cuts else []
                if on_policy:
                    comps = [s.text for s in drawn[0]]
                    result.samples += [
                        {"prompt": s.prompt, "text": s.text, "sampled_by": "student", "kind": "on_policy",
                         "step": step, "reference": None, "reward": math.nan} for s in drawn[0]
                    ]
                    batch = encode_distillation(tokenizer, b_prompts, comps, max_length).to(model.device)
                    state = held_prefix(trunk, model, batch) if trunk is not None else None
                    if state is None:  # a prompt the sampler did not keep (cut to max_length, evicted)
                        state = split.prefix(batch)
                    with torch.no_grad(), teacher():
                        t_logits = split.completion_logits(state, batch)
                else:
                    batch, state = d_cache.batch(idx)
                    t_logits = d_cache.teacher_logits(idx, batch)
                with student(), captured_inputs(cms, dst) as pos:
                    s_logits = split.completion_logits(state, batch)
                distill = distillation_loss(t_logits, s_logits, cfg.divergence, cfg.beta)
                route = None
                if r_idx:  # old tasks: the old model teaches
                    # all_positions: keep the old function on every token, not just the label's
                    r_batch, r_state = r_cache.batch(r_idx)
                    rt_logits = r_cache.teacher_logits(r_idx, r_batch)
                    with student(), captured_inputs(cms, dst) as neg:
                        rs_logits = split.completion_logits(r_state, r_batch)
                    distill = distill + cfg.rehearsal.weight * distillation_loss(rt_logits, rs_logits, cfg.divergence, cfg.beta)
                    if route_weight > 0:  # the new expert fires on this period's inputs, not on the old tasks'
                        route = routing_loss(router_logits(cms, dst, [slot], [x[0] for x in pos], batch.segment >= 0),
                                             router_logits(cms, dst, [slot], [x[0] for x in neg], r_batch.segment >= 0))
                if a_idx:  # the teacher's function on the text it was trained on
                    a_batch, a_state = a_cache.batch(a_idx)
                    at_logits = a_cache.teacher_logits(a_idx, a_batch)
                    with student():
                        as_logits = split.completion_logits(a_state, a_batch)
                    distill = distill + anchor_weight * distillation_loss(at_logits, as_logits, cfg.divergence, cfg.beta)
                loss, mean_reward = cfg.alpha * distill, math.nan
                if route is not None:
                    loss = loss + route_weight * route
                if cuts:
                    pg, mean_reward, rows = _imitation_loss(model, tokenizer, student, cuts, conts, cfg, max_length,
                                                            judge, step)
                    loss = loss + (1 - cfg.alpha) * pg
                    result.samples += rows
                _step(optimizer, loss, new_params, cfg.grad_clip, f"consolidation loss at step {step}")
                rec = StepRecord(step, float(loss.item()), float(distill.item()), mean_reward, on_policy)
                result.steps.append(rec)
                if on_step is not None:
                    on_step(rec)
    finally:
        model.eval()
        for p in new_params:
            p.grad = None
    if r_cache is not None and cfg.rehearsal.steps > 0:
        result.rehearsal_steps = rehearse_alone(model, cms, split, r_cache, new_params, student, cfg, rng, on_step,
                                                keep=d_cache if cfg.rehearsal.anchor_current else None)
    return _release(cms, src, dst, slot, freeze, result)


def _step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, params: Sequence[torch.nn.Parameter],
          grad_clip: float, what: str) -> None:
    """One clipped optimizer step on ``loss``; NonFiniteLossError (naming ``what``) on a NaN/inf loss."""
    if not math.isfinite(loss.item()):
        raise NonFiniteLossError(f"non-finite {what}: {loss.item()}")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()


def _teacher_rows(data: Sequence) -> list[dict]:
    """The dreams table's rows of the teacher's samples on this period's prompts."""
    return [{"prompt": s.prompt, "text": s.text, "sampled_by": "teacher", "kind": "teacher_data", "step": 0,
             "reference": None, "reward": math.nan} for s in data]


def rehearse_alone(
    model: PreTrainedModel,
    cms: ContinuumMemory,
    split: SplitForward,
    cache: PrefixCache,
    new_params: Sequence[torch.nn.Parameter],
    student: Callable[[], contextlib.AbstractContextManager],
    cfg: ConsolidationConfig,
    rng: random.Random,
    on_step: Callable[[StepRecord], None] | None = None,
    keep: PrefixCache | None = None,
) -> list[StepRecord]:
    """``cfg.rehearsal.steps`` steps on the rehearsal dreams alone, after the copy and any distillation.

    What a wake overwrote of an old task, the copy of its fast expert keeps; here the old model (the faster
    level masked, the new expert hidden: ``cache``'s teacher) teaches the new expert its answers on dreamed
    inputs of the earlier tasks, eq. (3) with D the rehearsal dreams only: this period's inputs are not
    drawn, so their copied function is moved only as far as the two share the expert. Only ``new_params``
    learn (a fresh AdamW at ``cfg.lr``); batches of ``cfg.rehearsal.batch_size`` dreams, loss
    ``distillation_loss(old teacher, student)`` on the label's tokens (every token with
    ``cfg.rehearsal.all_positions``). ``keep`` (``cfg.rehearsal.anchor_current``): the teacher's samples on this
    period's prompts with their teacher (the model as the wake left it, the new expert hidden), a batch of
    ``cfg.batch_size`` of them beside every rehearsal batch, the same loss added: the old model never answers
    with this period's new labels, so without it the steps teach the expert to withhold them everywhere.
    Raises NonFiniteLossError on a NaN/inf loss.
    """
    records: list[StepRecord] = []
    if cfg.rehearsal.steps == 0:
        return records
    optimizer = torch.optim.AdamW(new_params, lr=cfg.lr, weight_decay=0.0)
    model.train()
    try:
        with cms.trainable_only(new_params):
            for k in range(1, cfg.rehearsal.steps + 1):
                idx = _draw(cache.pairs, rng, cfg.rehearsal.batch_size)
                batch, state = cache.batch(idx)
                t_logits = cache.teacher_logits(idx, batch)
                with student():
                    s_logits = split.completion_logits(state, batch)
                loss = distillation_loss(t_logits, s_logits, cfg.divergence, cfg.beta)
                if keep is not None:  # this period's prompts keep the copy's answers
                    k_idx = _draw(keep.pairs, rng, cfg.batch_size)
                    k_batch, k_state = keep.batch(k_idx)
                    kt_logits = keep.teacher_logits(k_idx, k_batch)
                    with student():
                        ks_logits = split.completion_logits(k_state, k_batch)
                    loss = loss + distillation_loss(kt_logits, ks_logits, cfg.divergence, cfg.beta)
                _step(optimizer, loss, new_params, cfg.grad_clip, f"rehearsal loss at rehearsal step {k}")
                rec = StepRecord(cfg.steps + k, float(loss.item()), float(loss.item()), math.nan, False)
                records.append(rec)
                if on_step is not None:
                    on_step(rec)
    finally:
        model.eval()
        for p in new_params:
            p.grad = None
    return records


def _release(cms: ContinuumMemory, src: int, dst: int, slot: int, freeze: bool,
             result: ConsolidationResult) -> ConsolidationResult:
    """A consolidation's end: level ``src`` is freed, the filled expert made read-only for wake where asked."""
    cms.free_since_sleep(src, reason=f"consolidated into level {dst} slot {slot}")
    if freeze:
        cms.freeze(dst, slot, reason=f"consolidated from level {src}")
    return result


def _draw(pairs: Sequence, rng: random.Random, k: int) -> list[int]:
    """Indices of up to ``k`` distinct items of ``pairs``, drawn with ``rng``."""
    return rng.sample(range(len(pairs)), min(k, len(pairs)))


def every_position(batch: Batch) -> Batch:
    """The same batch with every token after an example's first one marked for distillation (M grows
    from the completion tokens to all predicted tokens)."""
    mask = (batch.segment >= 0) & (batch.position_ids > 0)
    return dataclasses.replace(batch, completion_mask=mask)


@contextlib.contextmanager
def _weights_swapped(params: Sequence[torch.nn.Parameter], values: Sequence[torch.Tensor]) -> Iterator[None]:
    """Temporarily give ``params`` the tensors ``values`` (same shapes); gradients must be off meanwhile."""
    saved = [p.data for p in params]
    try:
        for p, v in zip(params, values):
            p.data = v
        yield
    finally:
        for p, v in zip(params, saved):
            p.data = v


def _imitation_cuts(tokenizer: PreTrainedTokenizerBase, data: list, cfg: ConsolidationConfig,
                    rng: random.Random) -> list[tuple[str, str]]:
    """Learning to Imitate's draws: ``cfg.lti_prefixes`` teacher sequences of D, each cut at a random token
    into (prompt + head, tail); the student continues each head ``cfg.lti_group_size`` times."""
    return [_cut(tokenizer, data[i].prompt, data[i].text, rng) for i in _draw(data, rng, cfg.lti_prefixes)]


def _imitation_loss(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    student: Callable,
    cuts: list[tuple[str, str]],
    conts: list,
    cfg: ConsolidationConfig,
    max_length: int,
    judge: SemanticJudge | None,
    step: int,
) -> tuple[torch.Tensor, float, list[dict]]:
    """Learning to Imitate: policy-gradient surrogate -E[A * log p_S(continuation)] and the mean reward, for
    the student's continuations ``conts`` (cut-major, ``cfg.lti_group_size`` per cut) of the ``cuts``."""
    G = cfg.lti_group_size
    refs = [ref for _, ref in cuts for _ in range(G)]
    texts = [c.text for c in conts]
    rewards = torch.tensor(imitation_reward(texts, refs, cfg.gamma, cfg.z0, judge if cfg.gamma > 0 else None))
    adv = group_advantages(rewards.view(len(cuts), G)).flatten()
    with student():  # each cut's prompt once, its G continuations after it
        logp, n = grouped_logprobs(model, tokenizer, [p for p, _ in cuts],
                                   [texts[i * G : (i + 1) * G] for i in range(len(cuts))], max_length)
    pg = -(adv.to(logp.device) * logp / n.clamp(min=1)).mean()
    rows = [
        {"prompt": c.prompt, "text": c.text, "sampled_by": "student", "kind": "imitation", "step": step,
         "reference": ref, "reward": float(r)} for c, ref, r in zip(conts, refs, rewards.tolist())
    ]
    return pg, float(rewards.mean()), rows


__all__ = [
    "ConsolidationResult",
    "EmptyPromptBufferError",
    "PrefixCache",
    "SplitForward",
    "StepRecord",
    "consolidate",
    "due_consolidations",
    "encode_distillation",
    "rehearse_alone",
]


def period_expert(cms: ContinuumMemory, level: int, period: int) -> int | None:
    """The slot of ``level`` that the sleep after wake period ``period`` filled by consolidation (None: none)."""
    slots = [e.slot for e in cms.experts[level]
             if e.active and e.period == period and (e.origin or "").startswith("consolidation:")]
    return slots[-1] if slots else None


def fold_dreams(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    cms: ContinuumMemory,
    period: int,
    prompts: Sequence[str],
    cfg: ConsolidationConfig,
    max_length: int,
    judge: SemanticJudge | None,
    seed: int,
    sampling: SamplingConfig | None = None,
    rehearsal: Sequence[tuple[str, str]] = (),
    dreams: Sequence[tuple[str, str]] = (),
    dream_weight: float = 0.0,
) -> ConsolidationResult | None:
    """Fold what a sleep's dreams trained into the fast level (level 0) into the level-1 expert the
    same sleep consolidated, then free the fast level (``dream.fold_into_slow``).

    It is Knowledge Seeding again, in place: the teacher is the whole model (the dream-trained
    fast level on, the expert as consolidation left it), the student the model with the fast
    level masked, and only that expert learns; ``rehearsal`` pairs keep their old teacher (fast
    level masked, the expert as it was). So the dreams stay with their period's expert, which
    prototype routing gives the period's inputs, and the next wake starts from an empty fast
    level instead of a dream-trained one. With ``dream_weight`` > 0 the teacher is also distilled on
    ``dreams``, the (train prompt, dream) pairs the fast level was trained on, at every token
    (``dream.fold_dream_weight``): the wake prompts alone show only what the dreams changed on them.
    Returns None (nothing changed) when this sleep filled no level-1 expert.
    """
    if cms.n_levels < 2:
        return None
    slot = period_expert(cms, 1, period)
    if slot is None:
        return None
    return consolidate(model, tokenizer, cms, 0, 1, prompts, cfg, max_length, judge, seed,
                       origin=f"dream-fold@period-{period}", sampling=sampling, rehearsal=rehearsal, into=slot,
                       anchors=dreams, anchor_weight=dream_weight)
