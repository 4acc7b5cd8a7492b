"""Capacity that never runs out: merge two experts of a full level into one.

A level has ``E_max`` pre-allocated slots, and every sleep unlocks one in the slower
level. Without a policy the slow level is full after ``E_max - initial_experts`` sleeps
and the next sleep has nowhere to consolidate (``NoFreeSlotError``): a nightly run would
die on its seventh night. When a level is full, sleep first merges two read-only experts
(:func:`pair_to_merge`: the two oldest, or the oldest two of one period) into the older
one's slot, by distillation, layer by layer:

    target_l(h) = sum_{e in {e1, e2}} sigmoid(r_e . h) * B_e act(A_e h)      (their gated sum)
    min_{A, B, r}  mean_h || sigmoid(r . h) * B act(A h) - target_l(h) ||^2

over the hidden states ``h`` that reach the level in that layer on the sleep's own
prompts (the period's prompts and the rehearsal dreams: no stored data). With ``in_view``
(``consolidation.merge_in_view``) and prototype routing, each prompt is read in the view of the
period it routes to, as the model answers it, and its target holds only the pair's experts that
fire in that view: a prompt of period p sees experts of periods <= p, so where the younger
expert's period is later than p the merged expert is fitted to the older expert alone (the sum
would teach it to add the younger period's function to the older period's inputs); prompts of
periods before the older expert's, which the merged expert never answers, are left out. The merged
expert keeps the older expert's slot and provenance, and stays frozen if either was; the younger slot is freed.
In each layer the fit starts from the weights of whichever of the two gives the larger part of the target: an
expert whose router is saturated off on every input (sigmoid(r . h) ~ 0, as happens in the top layer, where h is
large) gets no gradient, and a fit started from it ended with relative error 1.0, the other's function dropped
(docs/results/issue13/rerun-exact/); with ``consolidation.merge_start: both`` it is also fitted from the other
start and the better of the two fits is kept (:func:`fit_sum`). Each layer is fitted on its own
inputs, which do not depend on the level's other layers' experts being merged (the
inputs are captured once, before the merge).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from model.memory.cms import CMSError, ContinuumMemory, ExpertBank, copy_bank_expert
from model.memory.routed import period_view, routed_periods
from model.memory.routing import captured_inputs
from model.memory.wake import encode


@dataclass(frozen=True)
class MergeRecord:
    """What a merge did: the slots merged (``into`` keeps the result), and the fit per layer."""

    level: int
    into: int
    freed: int
    relative_error: list[float]  # per CMS layer: ||fit - target|| / ||target|| after the merge
    started_from: list[str]  # per CMS layer: "into" or "freed", whose weights the fit started from
    kept_start: list[bool]  # per CMS layer: the fit's steps made it worse, so it ended where it started
    other_start_error: list[float | None]  # per CMS layer, merge_start both: the error the losing start ended at
    periods: tuple[int | None, int | None]  # the periods of ``into`` and ``freed`` before the merge


@dataclass(frozen=True)
class AbsorbRecord:
    """What :func:`absorb_into` did: expert ``src`` = (level, slot) of a faster level was fitted into ``level``'s
    ``into`` and freed, with the fit per layer."""

    src: tuple[int, int]
    level: int
    into: int
    relative_error: list[float]
    started_from: list[str]  # per CMS layer: "into" or "src", whose weights the fit started from
    kept_start: list[bool]  # per CMS layer: the fit's steps made it worse, so it ended where it started
    other_start_error: list[float | None]  # per CMS layer, merge_start both: the error the losing start ended at


def gated_expert_output(bank: ExpertBank, h: torch.Tensor, slots: Sequence[int]) -> torch.Tensor:
    """sum_{e in slots} sigmoid(r_e . h) * B_e act(A_e h), every expert selected. h: (N, d) -> (N, d)."""
    out = torch.zeros_like(h)
    for s in slots:
        gate = torch.sigmoid(h @ bank.router[s])  # (N,)
        out = out + gate.unsqueeze(-1) * (bank.act(h @ bank.A[s]) @ bank.B[s])
    return out


def pair_to_merge(cms: ContinuumMemory, level: int, policy: str = "oldest") -> tuple[int, int]:
    """The two experts of ``level`` a merge combines, (older, younger), among its consolidated (else all active)
    experts. ``policy`` (consolidation.merge_pair): ``oldest``, the two oldest; ``same_period``, the oldest two that
    hold one period (a period's consolidated expert and its kept dream expert), else the two oldest.

    Prototype routing turns an expert on for the inputs of its period and of later ones, and a merged expert takes
    the older period: merging two periods' experts gives the older period's inputs the younger one's function too,
    while a same-period merge leaves every input with the functions it had, up to the fit."""
    if policy not in ("oldest", "same_period"):
        raise ValueError(f"unknown merge policy {policy!r} (oldest, same_period)")
    active = [e for e in cms.experts[level] if e.active]
    consolidated = [e for e in active if e.frozen or (e.origin or "").startswith("consolidation")]
    pool = consolidated if len(consolidated) >= 2 else active
    if len(pool) < 2:
        raise CMSError(f"level {level}: merging needs two active experts, it has {len(pool)} "
                       f"(n_experts={cms.cfg.levels[level].n_experts}); raise n_experts")
    ordered = sorted(pool, key=lambda e: ((e.unlocked_at_step or 0), e.slot))
    if policy == "same_period":
        by_period: dict[int, list] = {}
        for e in ordered:
            if e.period is not None:
                by_period.setdefault(e.period, []).append(e)
        pairs = [experts[:2] for experts in by_period.values() if len(experts) >= 2]
        if pairs:
            older, younger = pairs[0]  # by_period keeps the order of each period's oldest expert
            return older.slot, younger.slot
    older, younger = ordered[:2]
    return older.slot, younger.slot


@torch.no_grad()
def level_inputs(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cms: ContinuumMemory, level: int,
                 prompts: Sequence[str], max_length: int) -> list[torch.Tensor]:
    """The hidden states (N, d) that reach ``level`` in every CMS layer, over the tokens of ``prompts``."""
    if not prompts:
        raise CMSError("merging needs prompts to read the level's inputs from")
    batch = encode(tokenizer, list(prompts), [""] * len(prompts), max_length).to(model.device)
    keep = (batch.segment >= 0).flatten()
    with captured_inputs(cms, level) as seen:
        model.get_decoder()(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False)
    if any(not s for s in seen):  # a level masked or with no experts is not called: nothing to fit
        raise CMSError(f"level {level} was not reached in the forward pass (masked, or without active experts)")
    return [torch.cat([h.reshape(-1, h.shape[-1])[keep.to(h.device)].float() for h in s]) for s in seen]


def fit_groups(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cms: ContinuumMemory, level: int,
               pair: tuple[int, int], prompts: Sequence[str], max_length: int, in_view: bool,
               batch_size: int = 16) -> list[tuple[list[torch.Tensor], list[int]]]:
    """What a merge of ``pair`` fits: groups of (hidden states (N, d) per CMS layer, the pair's slots whose gated
    sum is their target). Without ``in_view`` or without prototypes: one group, every prompt with every expert on,
    target both experts. With them: one group per routed period p at or after the older expert's period, its
    prompts read in period p's view, target the pair's experts of periods <= p (see the module's docstring)."""
    periods = routed_periods(model, tokenizer, cms, prompts, batch_size, max_length) if in_view else None
    pair_periods = [cms.experts[level][s].period for s in pair]
    older = min((p for p in pair_periods if p is not None), default=None)
    groups = []
    for p in sorted({q for q in periods or [] if older is not None and q >= older}):
        with period_view(cms, p):
            inputs = level_inputs(model, tokenizer, cms, level, [x for x, q in zip(prompts, periods) if q == p],
                                  max_length)
        groups.append((inputs, [s for s, sp in zip(pair, pair_periods) if sp is None or sp <= p]))
    # no view (or no prompt routes where the merged expert answers): the pair's sum on every prompt, all experts on
    return groups or [(level_inputs(model, tokenizer, cms, level, prompts, max_length), list(pair))]


def fit_expert(bank: ExpertBank, slot: int, h: torch.Tensor, target: torch.Tensor, steps: int, lr: float,
               gen: torch.Generator) -> tuple[float, bool]:
    """Fit expert ``slot`` of ``bank`` (its A, B and router, from their current values) so that its gated output
    on ``h`` (N, d) matches ``target`` (N, d): ``steps`` Adam steps on minibatches of 512 rows. Returns the relative
    error ||fit - target|| / ||target|| after the fit, and whether the starting weights were kept (see below).

    The fit never ends worse than it started: where the steps raised the error on all of ``h``, the starting
    weights are put back. In the top CMS layer the inputs' norm is in the tens of thousands, so one Adam step of
    ``lr`` on every router coordinate moves r . h by hundreds and can gate the expert off on every input for good;
    a merge that started from the larger contribution ended there at relative error 1.0 (docs/results/issue13/
    merge-start/)."""
    params = [bank.A[slot], bank.B[slot], bank.router[slot]]
    start = [p.detach().clone() for p in params]
    start_error = _relative_error(bank, slot, h, target)
    saved = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    n = h.shape[0]
    for _ in range(steps):
        idx = torch.randperm(n, generator=gen)[: min(n, 512)].to(h.device)
        loss = (gated_expert_output(bank, h[idx], [slot]) - target[idx]).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    for p, flag in zip(params, saved):
        p.grad = None
        p.requires_grad_(flag)
    error = _relative_error(bank, slot, h, target)
    if not error <= start_error:  # worse (or NaN): keep the start
        with torch.no_grad():
            for p, v in zip(params, start):
                p.copy_(v)
        return start_error, True
    return error, False


@dataclass(frozen=True)
class LayerFit:
    """One CMS layer of a merge: the relative error the merged expert ended at, whether its fit started from the
    other expert's weights, whether the fit kept its start (:func:`fit_expert`), and with ``start="both"`` the
    error the losing start ended at (None when only one start was fitted)."""

    error: float
    from_other: bool
    kept_start: bool
    other_start_error: float | None = None


def fit_sum(bank: ExpertBank, slot: int, own: torch.Tensor, other_bank: ExpertBank, other_slot: int,
            other: torch.Tensor, h: torch.Tensor, steps: int, lr: float, gen: torch.Generator,
            start: str = "larger") -> LayerFit:
    """Fit expert ``slot`` of ``bank`` to ``own + other`` on ``h`` (each (N, d): its own and expert ``other_slot`` of
    ``other_bank``'s gated outputs). ``start`` (``consolidation.merge_start``): ``larger``, from whichever of the two
    has the larger output (it copies the other expert first when that one's is): an expert gated off on every input
    (sigmoid(r . h) ~ 0, as in the top CMS layer, where h is large) gets no gradient and could never take the other's
    function in. ``both``: that fit, then the same steps on the same minibatches from the other start, keeping the
    one with the lower error on all of ``h``; a tie keeps the larger start, so ``both`` never ends worse than
    ``larger`` and the generator advances as it does under ``larger``. The larger output is not always the better
    start: in the top layer a start that holds most of the target can sit where no step helps
    (docs/results/issue13/merge-start/)."""
    if start not in ("larger", "both"):
        raise ValueError(f"unknown merge start {start!r} (larger, both)")
    larger_is_other = bool(other.norm() > own.norm())
    params = [bank.A[slot], bank.B[slot], bank.router[slot]]
    original = [p.detach().clone() for p in params]
    state = gen.get_state()
    target = own + other

    def fit_from(from_other: bool, g: torch.Generator) -> tuple[float, bool]:
        with torch.no_grad():
            if from_other:
                copy_bank_expert(other_bank, other_slot, bank, slot)
            else:
                for p, v in zip(params, original):
                    p.copy_(v)
        return fit_expert(bank, slot, h, target, steps, lr, g)

    error, kept = fit_from(larger_is_other, gen)
    if start == "larger":
        return LayerFit(error, larger_is_other, kept)
    first = [p.detach().clone() for p in params]
    alt_error, alt_kept = fit_from(not larger_is_other, torch.Generator().set_state(state))
    if alt_error < error:
        return LayerFit(alt_error, not larger_is_other, alt_kept, error)
    with torch.no_grad():
        for p, v in zip(params, first):
            p.copy_(v)
    return LayerFit(error, larger_is_other, kept, alt_error)


def _fit_columns(fits: Sequence[LayerFit], other: str) -> tuple[list, list, list, list]:
    """A record's per-layer columns: relative errors, starts ("into" or ``other``), kept starts, losing starts'
    errors."""
    return ([round(f.error, 5) for f in fits], [other if f.from_other else "into" for f in fits],
            [f.kept_start for f in fits],
            [None if f.other_start_error is None else round(f.other_start_error, 5) for f in fits])


@torch.no_grad()
def _relative_error(bank: ExpertBank, slot: int, h: torch.Tensor, target: torch.Tensor) -> float:
    """||gated output of ``slot`` on h - target|| / ||target||: h, target (N, d) -> a float."""
    return float((gated_expert_output(bank, h, [slot]) - target).norm() / target.norm().clamp(min=1e-12))


def joins_periods(cms: ContinuumMemory, level: int, pair: tuple[int, int]) -> bool:
    """Whether merging ``pair`` of ``level`` would give one expert two periods' functions (an expert without a
    period counts as a period of its own)."""
    a, b = (cms.experts[level][s].period for s in pair)
    return a is None or b is None or a != b


def merge_pair(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    cms: ContinuumMemory,
    level: int,
    prompts: Sequence[str],
    max_length: int,
    steps: int,
    lr: float,
    seed: int,
    policy: str = "oldest",
    in_view: bool = False,
    start: str = "larger",
) -> MergeRecord:
    """Merge the two experts of ``level`` that ``policy`` picks (:func:`pair_to_merge`) into the older one's slot;
    free the younger. ``in_view``: fit each prompt in its routed period's view (:func:`fit_groups`); ``start``: where
    each layer's fit starts (:func:`fit_sum`). Mutates ``cms``."""
    into, freed = pair_to_merge(cms, level, policy)
    groups = fit_groups(model, tokenizer, cms, level, (into, freed), prompts, max_length, in_view)
    gen = torch.Generator().manual_seed(seed)
    fits = []
    for k, bank in enumerate(cms.banks(level)):
        with torch.no_grad():  # each group's target: the sum of its slots' gated outputs
            h = torch.cat([inputs[k] for inputs, _ in groups])
            parts = {s: torch.cat([gated_expert_output(bank, inputs[k], [s]) if s in slots
                                   else torch.zeros_like(inputs[k]) for inputs, slots in groups]) for s in (into, freed)}
        fits.append(fit_sum(bank, into, parts[into], bank, freed, parts[freed], h, steps, lr, gen, start))
    was_frozen = cms.experts[level][into].frozen or cms.experts[level][freed].frozen
    pair_periods = (cms.experts[level][into].period, cms.experts[level][freed].period)
    periods = [p for p in pair_periods if p is not None]
    cms.reset_slot(level, freed, reason=f"merged into slot {into}")
    info = cms.experts[level][into]
    info.frozen = was_frozen
    info.period = min(periods) if periods else None  # it answers for the older period's inputs too
    info.history.append(f"merged@{cms.step}:slot {freed} merged in")
    return MergeRecord(level, into, freed, *_fit_columns(fits, "freed"), periods=pair_periods)


def absorb_into(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    cms: ContinuumMemory,
    src: tuple[int, int],
    level: int,
    into: int,
    prompts: Sequence[str],
    max_length: int,
    steps: int,
    lr: float,
    seed: int,
    start: str = "larger",
) -> AbsorbRecord:
    """Fold expert ``src`` = (faster level, slot) into expert ``into`` of ``level``, a merge across levels, then
    free ``src``. Per CMS layer, on the hidden states h (N, d) that reach ``level`` on ``prompts`` (the caller masks
    what must be off, e.g. the fast level, as the level will read them once ``src`` is gone; ``start``: where each
    layer's fit starts, :func:`fit_sum`):

        target_l(h) = sigmoid(r_into . h) B_into act(A_into h) + sigmoid(r_src . h) B_src act(A_src h)

    fitted into ``into`` as :func:`merge_pair` fits a pair; ``into`` keeps its slot, period, provenance and
    read-only flag, the fit starting where :func:`fit_sum` says (by default from the larger gated output). It is
    what a full
    level does with a kept dream expert whose only merge partner would be another period's: the dream joins its own
    period's expert instead. Mutates ``cms``."""
    src_level, src_slot = src
    if src_level == level:
        raise CMSError(f"absorb_into folds another level's expert into level {level}; use merge_pair within a level")
    for lv, slot in ((src_level, src_slot), (level, into)):
        if slot not in cms.active_slots(lv):
            raise CMSError(f"cannot absorb: level {lv} slot {slot} is not active")
    inputs = level_inputs(model, tokenizer, cms, level, prompts, max_length)
    gen = torch.Generator().manual_seed(seed)
    fits = []
    for bank, bank_src, h in zip(cms.banks(level), cms.banks(src_level), inputs):
        with torch.no_grad():
            own, other = gated_expert_output(bank, h, [into]), gated_expert_output(bank_src, h, [src_slot])
        fits.append(fit_sum(bank, into, own, bank_src, src_slot, other, h, steps, lr, gen, start))
    cms.reset_slot(src_level, src_slot, reason=f"absorbed into level {level} slot {into}")
    cms.experts[level][into].history.append(f"absorbed@{cms.step}:level-{src_level}/slot-{src_slot}")
    return AbsorbRecord((src_level, src_slot), level, into, *_fit_columns(fits, "src"))


__all__ = ["AbsorbRecord", "LayerFit", "MergeRecord", "absorb_into", "fit_expert", "fit_groups", "fit_sum",
           "gated_expert_output", "joins_periods", "level_inputs", "merge_pair", "pair_to_merge"]
