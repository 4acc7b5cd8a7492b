"""Sleep, stage 2: dreaming (paper 3.4, building on SEAL; docs/design.md §3).

For a task (C, tau) -- a context C from the recent wake period and a measure tau of
how well the model knows it *without* C in context (:class:`DreamTask`: a SQuAD
passage and its questions, or a few labelled examples and held-out examples of the
class-incremental stream) -- one ReST-EM round is:

1. *Dream*: sample m dreams with C in the prompt (SEAL's "implications" prompt). In
   dream mode every CMS router also activates one random active expert (novelty).
2. *Importance*: w_i from the gradient g_i of the SFT loss on dream i with respect to
   the trainable adapter parameters (the fast level): ``norm`` = ||g_i||, or
   ``alignment`` = cos(g_i, g_task) with g_task the gradient of the task loss.
3. *Select*: the top-k dreams by w plus b more at random (diversity).
4. *Try each selected dream in isolation*: a fresh LoRA per dream, SFT on that dream
   alone, tau before/after, reward 1 if tau improved (``model.sleep.trials``: k trials in
   one vectorised pass). The trials are independent and leave the model as it was, so
   :func:`dream_about` takes the step as a function (:data:`TrialFn`): in this
   process by default (:func:`try_dreams`), or split into groups run elsewhere from a
   copy of the model state (``tasks/trials.py``, ``dream.trial_workers``).
5. *ReST-EM*: fine-tune the dream generator on (prompt -> rewarded dream).

The generator is the dream policy (``dream.policy``, model/sleep/dream_policy.py): an adapter of its
own, on only while dreams are sampled, kept in the state from sleep to sleep, so ReST-EM's
updates carry to the next sleep and never touch the memory that answers. Without one
(``no_dream_policy``) the generator is the memory model and ReST-EM trains the fast level
(a fresh fast expert is unlocked if the last consolidation freed the level). After the
rounds, the dream table goes through the data gate (``checks/dreams.py``); dreams
that pass every check *and* were rewarded are promoted and trained into the fast level
by :func:`model.sleep.sft.train_on_pairs`.

The stage keeps its training only if it measurably helps (``dream.promotion_check``):
:func:`held_out_check` scores a check set of the period's examples that no dream saw in
its context, before the stage and after it, and :func:`training_helped` decides; when it
did not help, the sleep's state is the consolidated one.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from model.config import DreamConfig, SamplingConfig
from model.decoding.sampling import sample_continuations
from model.evaluation.knowledge import Passage, answer_completion, qa_prompt
from model.memory.cms import DREAM_ORIGIN, ContinuumMemory
from model.memory.merging import AbsorbRecord, MergeRecord, absorb_into, joins_periods, merge_pair, pair_to_merge
from model.memory.wake import encode, label_text, sft_loss, split_template
from model.sleep.consolidation import period_expert
from model.sleep.dream_policy import DreamPolicy, rest_em_update
from model.sleep.sft import train_on_pairs
from model.sleep.trial_lora import AnswerLoglik
from model.sleep.trials import TrialRecipe, TrialResult, run_trials


@dataclass(frozen=True)
class DreamTask:
    """A task (C, tau): a context C, and tau's (prompt, answer) pairs scored without C.

    tau = mean log-likelihood per token of the answers (higher is better).
    """

    context_id: str
    title: str
    context: str
    tau_prompts: tuple[str, ...]
    tau_answers: tuple[str, ...]
    prompt_template: str

    def __post_init__(self) -> None:
        if not self.tau_prompts:
            raise ValueError(f"dream task {self.context_id!r} has no questions to measure tau with")
        if len(self.tau_prompts) != len(self.tau_answers):
            raise ValueError(f"dream task {self.context_id!r}: {len(self.tau_prompts)} prompts, {len(self.tau_answers)} answers")


def task_from_passage(passage: Passage, context_id: str, cfg: DreamConfig) -> DreamTask:
    """Knowledge incorporation: C = a passage; tau = its questions answered without it."""
    if not passage.questions:
        raise ValueError(f"passage {context_id!r} ({passage.title}) has no questions")
    return DreamTask(
        context_id, passage.title, passage.context,
        tuple(qa_prompt(q.question, cfg.qa_template) for q in passage.questions),
        tuple(answer_completion(q.answer) for q in passage.questions),
        cfg.prompt_template,
    )


def task_from_examples(
    examples: Sequence[tuple[str, str]], held_out: Sequence[tuple[str, str]], template: str, context_id: str, cfg: DreamConfig
) -> DreamTask:
    """Class-incremental stream: C = a few labelled examples; tau = held-out label log-likelihood."""
    context = "\n".join(template.format(text=t, label=label_text(lab)) for t, lab in examples)
    pairs = [split_template(template, t, lab) for t, lab in held_out]
    labels = sorted({label_text(lab) for _, lab in examples})
    return DreamTask(
        context_id, "Intents: " + ", ".join(labels), context,
        tuple(p for p, _ in pairs), tuple(c for _, c in pairs), cfg.examples_prompt_template,
    )


def dream_prompt(tokenizer: PreTrainedTokenizerBase, task: DreamTask, cfg: DreamConfig) -> str:
    """The prompt a dream is sampled after: the template with C filled in (chat-wrapped if asked)."""
    text = task.prompt_template.replace("{title}", task.title).replace("{context}", task.context)
    if cfg.chat and tokenizer.chat_template:
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    return text


def train_prompt(task: DreamTask, cfg: DreamConfig) -> str:
    """The prompt a dream (or the context itself) is trained after, with no context in it."""
    return cfg.train_template.replace("{title}", task.title)


def fast_parameters(cms: ContinuumMemory, origin: str) -> list[nn.Parameter]:
    """Parameters of the fast level's writable experts, unlocking one if it has none (it was freed, or holds only
    kept-dream experts)."""
    if not cms.writable_slots(0):
        cms.unlock(0, origin=origin)
    return cms.level_parameters(0, cms.writable_slots(0))


def dream_slots(cms: ContinuumMemory, period: int) -> list[int]:
    """The writable fast experts this sleep's dream stage unlocked (and trained) for ``period``."""
    return [e.slot for e in cms.experts[0] if e.active and not e.frozen and e.period == period
            and (e.origin or "").startswith(DREAM_ORIGIN)]


def keep_dreams(cms: ContinuumMemory, period: int, top_k: int) -> list[int]:
    """``dream.keep_dreams``: make the fast experts this sleep's dream stage unlocked and trained read-only, with
    ``period`` (the inputs routed to it keep what the dreams taught; later consolidations spare them).

    Done only while the fast level keeps a free slot for the next wake and, with them, fewer kept-dream experts
    than its ``top_k`` (gates are not renormalised, so the wake's expert then always fires beside them). Returns
    the slots made read-only ([]: none, the level would be too full, or the dreams trained a wake expert).
    """
    slots = dream_slots(cms, period)
    if not slots or len(cms.free_slots(0)) < 1 or len(cms.kept_dream_slots(0)) + len(slots) >= top_k:
        return []
    for s in slots:
        cms.freeze(0, s, reason=f"kept dreams of period {period}")
    return slots


@dataclass(frozen=True)
class KeptInSlow:
    """What :func:`keep_dreams_in_slow` did: fast ``src`` became slow ``slot`` (``exact``: same function);
    ``merged``: the merge that made room first (None: a slot was free); ``absorbed``: the slow level was full and
    the dream expert was fitted into its period's consolidated expert ``slot`` instead (not kept apart)."""

    src: int
    slot: int
    exact: bool
    merged: MergeRecord | None
    absorbed: AbsorbRecord | None = None


def keep_dreams_in_slow(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    cms: ContinuumMemory,
    period: int,
    prompts: Sequence[str],
    max_length: int,
    merge_steps: int,
    lr: float,
    seed: int,
    merge_when_full: bool = True,
    merge_policy: str = "oldest",
    merge_in_view: bool = False,
    when_full: str = "merge",
    merge_start: str = "larger",
) -> KeptInSlow | None:
    """``dream.keep_dreams_in: slow``: move the fast expert this sleep's dream stage unlocked and trained into a new
    read-only expert of the slow level (level 1) with ``period``, and free its fast slot.

    The copy is exact (:meth:`ContinuumMemory.copy_expert`: the slow rank is at least the fast one, the same
    layers and gate). The function changes only through the slow level's other experts, which now read h instead of
    h plus the moved expert's output. A full slow level first merges two read-only experts, the pair
    ``merge_policy`` picks (:func:`model.memory.merging.merge_pair`, on ``prompts`` with the fast level masked, as
    the slow level will read them after the move; in each prompt's view with ``merge_in_view``), so dream experts
    are retired by the same merges as consolidated ones. ``when_full`` (``dream.keep_dreams_when_full``): ``merge``,
    always that merge; ``absorb``, when that merge would join two periods' experts and the period has a consolidated
    slow expert, the dream expert is fitted into that expert instead (:func:`model.memory.merging.absorb_into`, on
    the same inputs): no period's inputs get another period's function for a dream's sake. ``merge_start``: where
    either fit starts (:func:`model.memory.merging.fit_sum`). Returns None, changing
    nothing, when the dream stage trained no expert of its own (it trained a wake expert) or the slow level is full
    and may not merge.
    """
    if when_full not in ("merge", "absorb"):
        raise ValueError(f"unknown when_full {when_full!r} (merge, absorb)")
    slots = dream_slots(cms, period)
    if len(slots) != 1 or cms.n_levels < 2:
        return None
    (src,) = slots
    merged = None
    if not cms.free_slots(1):
        if not merge_when_full:
            return None
        home = period_expert(cms, 1, period)
        if when_full == "absorb" and home is not None and joins_periods(cms, 1, pair_to_merge(cms, 1, merge_policy)):
            with cms.levels_masked([0]):
                absorbed = absorb_into(model, tokenizer, cms, (0, src), 1, home, prompts, max_length, merge_steps, lr,
                                       seed, merge_start)
            return KeptInSlow(src, home, False, None, absorbed)
        with cms.levels_masked([0]):
            merged = merge_pair(model, tokenizer, cms, 1, prompts, max_length, merge_steps, lr, seed, merge_policy,
                                merge_in_view, merge_start)
    slot = cms.unlock(1, origin=f"{DREAM_ORIGIN}period-{period}:fast->slow")
    exact = cms.copy_expert((0, src), (1, slot))
    cms.experts[1][slot].period = period
    cms.freeze(1, slot, reason=f"kept dreams of period {period}, from fast slot {src}")
    cms.reset_slot(0, src, reason=f"moved to slow slot {slot}")
    return KeptInSlow(src, slot, exact, merged)


def dream_parameters(cms: ContinuumMemory, cfg: DreamConfig, period: int, origin: str) -> list[nn.Parameter]:
    """Where a sleep's dreams are trained (ReST-EM and promotion; ``dream.train_into``).

    ``fast``: the fast level's active experts (:func:`fast_parameters`); the next wake then
    trains the same expert on the next period. ``consolidated``: the slower-level experts
    this period's consolidation filled, which belong to ``period`` and are read-only in
    wake, so what the dreams taught stays with the period's own inputs; the fast level when
    this sleep consolidated nothing.
    """
    if cfg.train_into == "consolidated":
        slots = {li: [e.slot for e in cms.experts[li]
                      if e.active and e.period == period and (e.origin or "").startswith("consolidation:")]
                 for li in range(1, len(cms.experts))}
        params = [p for li, s in slots.items() if s for p in cms.level_parameters(li, s)]
        if params:
            return params
    return fast_parameters(cms, origin)


def dream_policy(cms: ContinuumMemory, cfg: DreamConfig) -> "DreamPolicy | None":
    """The policy that writes this sleep's dreams (``dream.policy.enabled`` and the state carries one), else None."""
    return cms.dream_policy if cfg.policy.enabled else None


def generate_dreams(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    cms: ContinuumMemory,
    task: DreamTask,
    cfg: DreamConfig,
    seed: int,
    sampling: SamplingConfig | None = None,
) -> tuple[str, list[str]]:
    """Sample m dreams about ``task``'s context (random-expert routing in dream mode, the dream policy on when
    there is one: :func:`dream_policy`). Returns (prompt, dreams)."""
    sampling = sampling or SamplingConfig()
    prompt = dream_prompt(tokenizer, task, cfg)
    routing = cms.random_expert_routing(seed) if cfg.random_expert else contextlib.nullcontext()
    policy = dream_policy(cms, cfg)
    with routing, (policy.active() if policy is not None else contextlib.nullcontext()):
        samples = sample_continuations(
            model, tokenizer, [prompt], cfg.dreams_per_context, cfg.max_new_tokens, cfg.temperature, cfg.top_p, seed,
            batch_size=sampling.batch_size, min_new_tokens=cfg.min_new_tokens, dtype=sampling.compute_dtype,
        )
    return prompt, [s.text.strip() for s in samples]


def sft_gradient(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    params: Sequence[nn.Parameter],
    prompts: Sequence[str],
    completions: Sequence[str],
    max_length: int,
) -> torch.Tensor:
    """Flattened gradient (P,) of the SFT loss on (prompts -> completions) w.r.t. ``params``."""
    loss = sft_loss(model, encode(tokenizer, prompts, completions, max_length))
    grads = torch.autograd.grad(loss, list(params), allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)])


def importance_scores(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    params: Sequence[nn.Parameter],
    dream_prompt_: str,
    dreams: Sequence[str],
    task: tuple[list[str], list[str]],
    mode: str,
    max_length: int,
) -> list[float]:
    """w_i for every dream: ||g_i|| (``norm``), cos(g_i, g_task) (``alignment``) or uniform noise (``random``).

    g_i is the gradient of the SFT loss on dream i alone; an empty dream scores NaN.
    """
    if mode == "random":  # the "no gradient selection" ablation: no gradients, uniform scores
        rng = random.Random(f"{dream_prompt_}|{'|'.join(dreams)}")
        return [rng.random() if d else math.nan for d in dreams]
    g_task = sft_gradient(model, tokenizer, params, task[0], task[1], max_length) if mode == "alignment" else None
    scores = []
    for d in dreams:
        if not d:
            scores.append(math.nan)
            continue
        g = sft_gradient(model, tokenizer, params, [dream_prompt_], [d], max_length)
        if g_task is None:
            scores.append(float(g.norm()))
        else:
            scores.append(float(torch.nn.functional.cosine_similarity(g, g_task, dim=0)))
    return scores


def select_dreams(scores: Sequence[float], top_k: int, extra: int, rng: random.Random) -> dict[int, str]:
    """Indices of the top-k finite scores plus ``extra`` random others: {index: "topk" | "random"}."""
    finite = [i for i, s in enumerate(scores) if math.isfinite(s)]
    ranked = sorted(finite, key=lambda i: -scores[i])[:top_k]
    chosen = {i: "topk" for i in ranked}
    rest = [i for i in finite if i not in chosen]
    for i in rng.sample(rest, min(extra, len(rest))):
        chosen[i] = "random"
    return chosen


@dataclass(frozen=True)
class TrialBatch:
    """Step 4's input: try ``dreams[i]`` in isolation with adapter seed ``seeds[i]``, from the state of ``cms`` over
    ``model`` at the call (the generator as ReST-EM left it, the fast expert unlocked for the dreams)."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    cms: ContinuumMemory
    task: DreamTask
    cfg: DreamConfig
    dreams: Sequence[str]
    seeds: Sequence[int]


#: Step 4 as a function: one :class:`TrialResult` per dream of the batch, in order (``index`` = position in
#: ``dreams``); it must leave the model and ``cms`` as they were. The default is :func:`try_dreams`.
TrialFn = Callable[[TrialBatch], list[TrialResult]]


def try_dreams(batch: TrialBatch) -> list[TrialResult]:
    """The default :data:`TrialFn`: every dream tried in this process, all in one batched pass.

    tau is the task's answer log-likelihood; each dream trains a fresh LoRA on the CMS
    layers after :func:`train_prompt`. Any split of the dreams into groups gives the same
    results up to float rounding (the trials are independent).
    """
    model, task, cfg = batch.model, batch.task, batch.cfg
    measure = AnswerLoglik(model, batch.tokenizer, list(task.tau_prompts), list(task.tau_answers), cfg.max_length)
    recipe = TrialRecipe(steps=cfg.trial_steps, lr=cfg.trial_lr, r=cfg.lora_r, alpha=cfg.lora_alpha,
                         target_modules=cfg.lora_targets, layers=batch.cms.layer_ids, max_length=cfg.max_length,
                         prompt=train_prompt(task, cfg))
    return run_trials(model, batch.tokenizer, list(batch.dreams), measure, recipe, list(batch.seeds))


@dataclass
class DreamRow:
    """One dream of the dream table (see checks/dreams.py for the checks)."""

    dream_id: str
    period: int
    round: int
    context_id: str
    context: str
    prompt: str
    text: str
    n_tokens: int
    importance: float
    selected: bool
    selection: str
    tau_before: float
    tau_after: float
    reward: float
    trial_error: str | None


def dream_about(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    cms: ContinuumMemory,
    task: DreamTask,
    cfg: DreamConfig,
    period: int,
    seed: int,
    select: bool = True,
    run_trials_fn: TrialFn = try_dreams,
    sampling: SamplingConfig | None = None,
) -> list[DreamRow]:
    """R ReST-EM rounds on one context; returns every dream with its score, selection and reward.

    With ``select=False`` every dream is tried (the "no selection" ablation).
    ``run_trials_fn`` runs step 4 (default: in this process, one batched pass); ``sampling`` sets the
    decoder's batch size and dtype (default: SamplingConfig()).
    """
    rng = random.Random(seed)
    params = dream_parameters(cms, cfg, period, origin=f"{DREAM_ORIGIN}period-{period}")
    tau = (list(task.tau_prompts), list(task.tau_answers))
    t_prompt = train_prompt(task, cfg)
    rows: list[DreamRow] = []
    for rnd in range(cfg.rounds):
        r_seed = seed * 1_009 + rnd
        prompt, dreams = generate_dreams(model, tokenizer, cms, task, cfg, r_seed, sampling)
        with cms.trainable_only(params):
            scores = importance_scores(model, tokenizer, params, t_prompt, dreams, tau, cfg.importance, cfg.max_length)
        chosen = (
            select_dreams(scores, cfg.top_k, cfg.random_extra, rng)
            if select
            else {i: "all" for i, d in enumerate(dreams) if d}
        )
        order = sorted(chosen)
        results = {}
        if order:
            trial = run_trials_fn(TrialBatch(model, tokenizer, cms, task, cfg, [dreams[i] for i in order],
                                             [r_seed * 31 + i for i in order]))
            if len(trial) != len(order):
                raise RuntimeError(f"the trial step returned {len(trial)} results for {len(order)} dreams")
            results = dict(zip(order, trial))
        n_tok = [len(tokenizer(d, add_special_tokens=False)["input_ids"]) for d in dreams]
        for i, d in enumerate(dreams):
            res = results.get(i)
            rows.append(
                DreamRow(
                    dream_id=f"p{period}-{task.context_id}-r{rnd}-d{i}", period=period, round=rnd,
                    context_id=task.context_id, context=task.context, prompt=prompt, text=d, n_tokens=n_tok[i], importance=scores[i],
                    selected=i in chosen, selection=chosen.get(i, "none"),
                    tau_before=res.tau_before if res else math.nan,
                    tau_after=res.tau_after if res and res.tau_after is not None else math.nan,
                    reward=float(res.reward) if res and res.error is None else math.nan,
                    trial_error=res.error if res else None,
                )
            )
        rewarded = [dreams[i] for i, r in results.items() if r.reward == 1]
        if rewarded and cfg.rest_steps:  # ReST-EM: the generator imitates its rewarded dreams
            policy = dream_policy(cms, cfg)
            if policy is not None:  # the generator's own adapter, carried to the next sleep
                rest_em_update(model, tokenizer, policy, [prompt] * len(rewarded), rewarded, cfg.rest_steps,
                               cfg.max_length, origin=f"period {period}, {task.context_id}, round {rnd}")
            else:  # no policy of its own: the memory level that answers is the generator too
                train_on_pairs(model, tokenizer, params, [prompt] * len(rewarded), rewarded, cfg.rest_steps, cfg.lr,
                               cfg.max_length)
    return rows


def promote(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    cms: ContinuumMemory,
    tasks: dict[str, DreamTask],
    promoted: Sequence[tuple[str, str]],
    cfg: DreamConfig,
    period: int,
) -> list[float]:
    """Train promoted dreams ((context_id, text) pairs) where ``dream.train_into`` says; returns the SFT losses."""
    if not promoted:
        return []
    params = dream_parameters(cms, cfg, period, origin=f"{DREAM_ORIGIN}period-{period}")
    prompts = [train_prompt(tasks[c], cfg) for c, _ in promoted]
    return train_on_pairs(model, tokenizer, params, prompts, [t for _, t in promoted], cfg.promote_steps, cfg.lr, cfg.max_length)
