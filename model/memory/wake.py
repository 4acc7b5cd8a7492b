"""Wake: online learning of the memory levels on a stream of labelled text.

An example is written with a template such as ``"{text} -> {label}"``; the part
before ``{label}`` is the prompt and the label (plus EOS) is the completion. Wake
trains on the completion tokens only, one batch per step, and lets the
:class:`~model.memory.optimizer.ChunkedOptimizer` update each level every C(l) steps (eq. 2).
Accuracy is measured by label log-likelihood: the predicted label is the candidate
whose completion has the highest total log-probability.

The LM head (49k x 576 for SmolLM2) is applied only at the positions that predict a
completion token, so the loss and the scores do not pay for full-vocabulary logits
at every prompt position.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from model.config import LevelConfig
from model.decoding.architecture import decoder_of, expand_cache
from model.decoding.forward import Batch, TrunkCache, completion_logits, logprobs_by_example
from model.memory.cms import CMSError, ContinuumMemory
from model.memory.optimizer import ChunkedOptimizer
from model.memory.routing import captured_inputs, router_logits, routing_loss


def label_text(label: str) -> str:
    """How a label is written for the model: ``pin_change`` -> ``pin change``."""
    return label.replace("_", " ")


def split_template(template: str, text: str, label: str) -> tuple[str, str]:
    """Fill ``template`` and split it into (prompt, completion) at ``{label}``."""
    head = template[: template.rindex("{label}")]
    return head.format(text=text), label_text(label)


def encode(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], completions: Sequence[str], max_length: int,
    row_length: int | None = None,
) -> Batch:
    """Tokenise prompt and completion separately (the boundary is exact) and pack into rows.

    The completion gets an EOS token. Over-long prompts are cut from the left so the
    completion is always kept whole; a completion of ``max_length`` tokens or more is
    an error. Rows hold up to ``row_length`` tokens (default ``max_length``; first-fit,
    longest examples first), and the batch is as long as its fullest row: a few examples
    of a quarter of ``max_length`` in rows of ``max_length`` leave a fifth of the batch
    padding, which a wider row packs away (every example still attends to itself only).
    """
    row_length = max_length if row_length is None else row_length
    if row_length < max_length:
        raise ValueError(f"row_length ({row_length}) must be at least max_length ({max_length})")
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    if not prompts:
        raise ValueError("nothing to encode: no examples")
    p_ids = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    c_ids = tokenizer(list(completions), add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    examples: list[tuple[list[int], int]] = []
    for p, c, prompt, comp in zip(p_ids, c_ids, prompts, completions):
        if not p:
            raise ValueError(f"prompt {prompt!r} encodes to no tokens")
        c = list(c) + [eos]
        if len(c) >= max_length:
            raise ValueError(f"completion {comp!r} has {len(c)} tokens, more than max_length-1 ({max_length - 1})")
        p = list(p)[-(max_length - len(c)) :]
        examples.append((p + c, len(p)))
    rows: list[list[int]] = []  # example indices per row
    free: list[int] = []
    for k in sorted(range(len(examples)), key=lambda k: -len(examples[k][0])):
        n = len(examples[k][0])
        r = next((r for r, f in enumerate(free) if f >= n), None)
        if r is None:
            rows.append([])
            free.append(row_length)
            r = len(rows) - 1
        rows[r].append(k)
        free[r] -= n
    T = max(row_length - f for f in free)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    input_ids = torch.full((len(rows), T), pad, dtype=torch.long)
    position_ids = torch.zeros((len(rows), T), dtype=torch.long)
    segment = torch.full((len(rows), T), -1, dtype=torch.long)
    comp_mask = torch.zeros((len(rows), T), dtype=torch.bool)
    for r, members in enumerate(rows):
        at = 0
        for k in members:
            ids, n_prompt = examples[k]
            n = len(ids)
            input_ids[r, at : at + n] = torch.tensor(ids)
            position_ids[r, at : at + n] = torch.arange(n)
            segment[r, at : at + n] = k
            comp_mask[r, at + n_prompt : at + n] = True
            at += n
        position_ids[r, at:] = torch.arange(T - at)  # padding forms its own segment
    return Batch(input_ids, position_ids, segment, comp_mask, len(examples))


def completion_logprobs(model: PreTrainedModel, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log p(completion token | prefix) per example, and the token counts.

    Returns (logp: (N,), n: (N,)) in the order the examples were given. The output
    head runs on the M completion positions only: hidden (R, T, d) -> (M, d) -> logits (M, V).
    """
    batch = batch.to(model.device)
    # No KV cache: with one, transformers would not derive the block-diagonal (packed) mask.
    hidden = model.get_decoder()(
        input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False
    ).last_hidden_state
    return logprobs_by_example(completion_logits(model, hidden, batch), batch)


def grouped_logprobs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    completions: Sequence[Sequence[str]],
    max_length: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`completion_logprobs` of every (prompts[i], completions[i][j]) with each prompt computed once.

    Returns (logp: (N,), n: (N,)) prompt-major (N = the number of completions), with gradients. A row holds
    a prompt and then all its completions, each plus EOS; a tree-shaped mask lets each completion see the
    prompt and itself (its positions continue from the prompt's end), so it equals scoring each pair alone
    (:func:`encode` + :func:`completion_logprobs`) but pays for a prompt once where Learning to Imitate
    draws several continuations of one prompt. A prompt is cut from the left so that its longest
    completion fits in ``max_length``.
    """
    if len(prompts) != len(completions) or not prompts or any(not c for c in completions):
        raise ValueError(f"grouped_logprobs: need one non-empty list of completions per prompt, got {len(prompts)} "
                         f"prompts and {[len(c) for c in completions]} completions")
    eos = tokenizer.eos_token_id
    dev = model.device
    rows = []  # (ids, positions, mask (T, T), predicting position per target, targets) of each prompt
    for prompt, p, comps in zip(prompts, tokenizer(list(prompts), add_special_tokens=True)["input_ids"], completions):
        c_ids = [list(c) + [eos] for c in tokenizer(list(comps), add_special_tokens=False)["input_ids"]]
        longest = max(len(c) for c in c_ids)
        if not p:
            raise ValueError(f"prompt {prompt!r} encodes to no tokens")
        if longest >= max_length:
            raise ValueError(f"a completion has {longest} tokens, more than max_length-1 ({max_length - 1})")
        p = list(p)[-(max_length - longest):]
        n_p, T = len(p), len(p) + sum(len(c) for c in c_ids)
        mask = torch.zeros(T, T, dtype=torch.bool)
        mask[:n_p, :n_p] = torch.ones(n_p, n_p, dtype=torch.bool).tril()
        positions, pred, at = list(range(n_p)), [], n_p
        for c in c_ids:
            k = len(c)
            mask[at : at + k, :n_p] = True
            mask[at : at + k, at : at + k] = torch.ones(k, k, dtype=torch.bool).tril()
            positions += range(n_p, n_p + k)
            pred += [n_p - 1, *range(at, at + k - 1)]  # the first token is predicted at the prompt's end
            at += k
        rows.append((p + [t for c in c_ids for t in c], positions, mask, pred, [t for c in c_ids for t in c],
                     [len(c) for c in c_ids]))
    T = max(len(r[0]) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    pos = torch.zeros((len(rows), T), dtype=torch.long)
    mask = torch.eye(T, dtype=torch.bool).repeat(len(rows), 1, 1, 1)  # padding sees itself only
    for r, (row_ids, positions, row_mask, _, _, _) in enumerate(rows):
        n = len(row_ids)
        ids[r, :n], pos[r, :n], mask[r, 0, :n, :n] = torch.tensor(row_ids), torch.tensor(positions), row_mask
        pos[r, n:] = torch.arange(T - n)
    hidden = model.get_decoder()(input_ids=ids.to(dev), position_ids=pos.to(dev), attention_mask=mask.to(dev),
                                 use_cache=False).last_hidden_state
    at_row = torch.tensor([r for r, row in enumerate(rows) for _ in row[3]], device=dev)
    at_pos = torch.tensor([q for row in rows for q in row[3]], device=dev)
    targets = torch.tensor([t for row in rows for t in row[4]], device=dev)
    logits = model.get_output_embeddings()(hidden[at_row, at_pos]).float()  # (M, V): head on predicting positions
    token_lp = -F.cross_entropy(logits, targets, reduction="none")
    lengths = torch.tensor([k for row in rows for k in row[5]], device=dev)
    owner = torch.repeat_interleave(torch.arange(len(lengths), device=dev), lengths)
    logp = torch.zeros(len(lengths), dtype=token_lp.dtype, device=dev).index_add(0, owner, token_lp)
    return logp, lengths


def sft_loss(model: PreTrainedModel, batch: Batch) -> torch.Tensor:
    """Mean negative log-likelihood per completion token (scalar)."""
    logp, n = completion_logprobs(model, batch)
    return -logp.sum() / n.sum().clamp(min=1)


class NoWritableExpertError(CMSError):
    """A level that learns in wake has no writable expert and no free slot to unlock one."""


def ensure_writable(cms: ContinuumMemory, levels: Sequence[LevelConfig], origin: str) -> list[int]:
    """Give every level that starts with experts (``initial_experts`` > 0) a writable one for wake.

    A level freed by the last sleep, or whose every active expert is frozen (consolidated), gets
    a fresh expert (B = 0: the function does not change). Returns the levels that got one.
    Raises NoWritableExpertError naming the level when it has no free slot left.
    """
    unlocked = []
    for li, lvl in enumerate(levels):
        if not lvl.initial_experts or cms.writable_slots(li):
            continue
        if not cms.free_slots(li):
            raise NoWritableExpertError(
                f"level {li} ('{lvl.name}'): all {lvl.n_experts} experts are frozen consolidated experts and no "
                "slot is free, so wake has nothing to write; raise cms.levels[].n_experts or let sleep merge "
                "experts (consolidation.merge_when_full)"
            )
        cms.unlock(li, origin=origin)
        unlocked.append(li)
    return unlocked


@dataclass
class StepLog:
    step: int
    loss: float
    tokens: int
    updated_levels: list[int]


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/inf loss; the state must not be saved."""


def train_period(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    optimizer: ChunkedOptimizer,
    prompts: Sequence[str],
    completions: Sequence[str],
    batch_size: int,
    max_length: int,
    epochs: int = 1,
    on_step: Callable[[StepLog], None] | None = None,
    negatives: Sequence[str] = (),
    route_weight: float = 0.0,
    negatives_per_step: int = 8,
    seed: int = 0,
) -> list[StepLog]:
    """One wake period: read the examples in order, one optimiser step call per batch.

    Each level is updated only when its chunk ends (eq. 2); every other step just
    accumulates its gradients. Raises NonFiniteLossError on a NaN/inf loss.
    With ``negatives`` (dreamed inputs of other tasks) and ``route_weight`` > 0 the fast
    level's writable experts also learn L_route (model/memory/routing.py): their routers fire on
    this period's tokens and not on ``negatives_per_step`` negatives drawn per step.
    """
    rng = random.Random(seed)
    route = bool(negatives) and route_weight > 0
    model.train()
    logs: list[StepLog] = []
    n = len(prompts)
    cms = optimizer.cms
    writable = [p for li in range(cms.n_levels) for p in cms.level_parameters(li, cms.writable_slots(li))]
    with cms.trainable_only(writable):  # frozen (consolidated) experts get no gradient at all
        try:
            for _ in range(epochs):
                for start in range(0, n, batch_size):
                    batch = encode(tokenizer, prompts[start : start + batch_size], completions[start : start + batch_size], max_length)
                    slots = cms.writable_slots(0) if route else []
                    with captured_inputs(cms, 0) as pos:
                        loss = sft_loss(model, batch)
                    if slots and all(pos):
                        neg_texts = rng.sample(list(negatives), min(negatives_per_step, len(negatives)))
                        nb = encode(tokenizer, neg_texts, [""] * len(neg_texts), max_length).to(model.device)
                        with torch.no_grad(), captured_inputs(cms, 0) as neg:
                            model.get_decoder()(input_ids=nb.input_ids, position_ids=nb.position_ids, use_cache=False)
                        lp = router_logits(cms, 0, slots, [x[0] for x in pos], batch.segment >= 0)
                        ln = router_logits(cms, 0, slots, [x[0] for x in neg], nb.segment >= 0)
                        total = loss + route_weight * routing_loss(lp, ln)
                    else:
                        total = loss
                    if not math.isfinite(total.item()):
                        raise NonFiniteLossError(f"non-finite wake loss {total.item()} at step {optimizer.cms.step + 1}")
                    total.backward()
                    updated = optimizer.step()
                    log = StepLog(optimizer.cms.step, float(loss.item()), batch.n_tokens, updated)
                    logs.append(log)
                    if on_step is not None:
                        on_step(log)
        finally:
            model.eval()
    return logs


@torch.inference_mode()
def score_candidates(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    candidates: Sequence[str],
    batch_size: int,
    max_length: int,
    shared_prefix: str = "",
    trunk: TrunkCache | None = None,
) -> torch.Tensor:
    """Log-likelihood of every candidate completion (plus EOS) after every prompt: (P, C).

    Prefix sharing: one row holds a prompt followed by all C candidates, and a
    tree-shaped attention mask lets each candidate see the prompt and itself only
    (positions continue from the prompt for every candidate). The prompt is thus
    computed once instead of C times. ``batch_size`` bounds the prompt+candidate
    pairs per forward pass; prompts are cut from the left to ``max_length`` minus
    the longest candidate.

    ``shared_prefix`` (e.g. in-context demonstrations) comes before every prompt. It
    is computed once into a KV cache that every row attends to, instead of once per
    prompt; ``max_length`` then bounds prefix + prompt + candidate (a ValueError if the
    prefix leaves no room).

    ``trunk``: a :class:`~model.decoding.forward.TrunkCache` that keeps the layers below its ``start`` of
    each pass, for scoring the same prompts again in another state of the memory (not with a shared prefix).
    """
    if trunk is not None and shared_prefix:
        raise ValueError("score_candidates: a trunk cache does not apply with a shared prefix")
    eos = tokenizer.eos_token_id
    cands = [list(c) + [eos] for c in tokenizer(list(candidates), add_special_tokens=False)["input_ids"]]
    longest = max(len(c) for c in cands)
    if longest >= max_length:
        raise ValueError(f"a candidate has {longest} tokens, more than max_length-1 ({max_length - 1})")
    dev = model.device
    decoder = model.get_decoder()
    prefix_ids = tokenizer(shared_prefix, add_special_tokens=True)["input_ids"] if shared_prefix else []
    L = len(prefix_ids)
    if L + longest >= max_length:
        raise ValueError(f"the shared prefix has {L} tokens: no room for a prompt and the longest candidate "
                         f"({longest} tokens) within max_length {max_length}")
    prefix_cache = None
    if L:
        prefix_cache = decoder(input_ids=torch.tensor([prefix_ids], device=dev), use_cache=True).cache
    p_ids = [list(p)[-(max_length - L - longest) :]
             for p in tokenizer(list(prompts), add_special_tokens=not L)["input_ids"]]
    if any(not p for p in p_ids):
        raise ValueError("a prompt encodes to no tokens")
    cand_len = torch.tensor([len(c) for c in cands])
    flat_cands = torch.tensor([t for c in cands for t in c])  # (S,) all candidates back to back
    S = len(flat_cands)
    # Within the candidate block: token a may see token b iff same candidate and b <= a.
    owner = torch.repeat_interleave(torch.arange(len(cands)), cand_len)  # (S,)
    offset = torch.cat([torch.arange(n) for n in cand_len.tolist()])  # (S,) index inside its candidate
    block = (owner[:, None] == owner[None, :]) & (torch.arange(S)[None, :] <= torch.arange(S)[:, None])
    scores = torch.empty(len(prompts), len(candidates))
    per_call = max(1, batch_size // len(cands))
    order = sorted(range(len(prompts)), key=lambda i: len(p_ids[i]))
    for start in range(0, len(order), per_call):
        rows = order[start : start + per_call]
        P = max(len(p_ids[i]) for i in rows)
        T = P + S
        ids = torch.full((len(rows), T), tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos)
        pos = torch.zeros((len(rows), T), dtype=torch.long)
        mask = torch.zeros((len(rows), 1, T, L + T), dtype=torch.bool)
        mask[..., :L] = True  # every row sees the shared prefix (padding too: its outputs are never read)
        full, mask = mask, mask[..., L:]  # mask: the view over this batch's own tokens, filled below
        pred = torch.empty((len(rows), S), dtype=torch.long)  # position whose output predicts each candidate token
        for r, i in enumerate(rows):
            n = len(p_ids[i])
            ids[r, P - n : P] = torch.tensor(p_ids[i])  # left-pad the prompt so candidates start at P
            pos[r, P - n : P] = torch.arange(n)
            pos[r, P:] = n + offset
            ids[r, P:] = flat_cands
            mask[r, 0, P - n : P, P - n : P] = torch.ones(n, n, dtype=torch.bool).tril()
            mask[r, 0, P:, P - n : P] = True
            mask[r, 0, P:, P:] = block
            mask[r, 0, : P - n, : P - n] = torch.eye(P - n, dtype=torch.bool)  # padding sees itself only
            pred[r] = torch.where(offset == 0, P - 1, P + torch.arange(S) - 1)
        # one copy of the prefix's keys/values per row
        if trunk is not None:  # the layers below trunk.start once per distinct pass, the rest every time
            arch = decoder_of(model)
            ids, pos, full = ids.to(dev), pos.to(dev), full.to(dev)
            h = trunk.hidden(model, ids, pos, full)
            hidden = arch.norm(arch.run_layers(h, pos, trunk.start, mask=full))
        else:
            cache = expand_cache(prefix_cache, len(rows)) if prefix_cache is not None else None
            hidden = decoder(
                input_ids=ids.to(dev), position_ids=(pos + L).to(dev), attention_mask=full.to(dev),
                cache=cache, use_cache=cache is not None,
            ).last_hidden_state
        h = torch.gather(hidden, 1, pred.to(dev).unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))  # (R, S, d)
        logits = model.get_output_embeddings()(h).float()  # (R, S, V)
        targets = flat_cands.to(dev).repeat(len(rows))
        token_lp = -F.cross_entropy(logits.flatten(0, 1), targets, reduction="none").view(len(rows), S).cpu()
        per_cand = torch.zeros(len(rows), len(cands)).index_add(1, owner, token_lp)
        scores[rows] = per_cand
    return scores


def label_scores(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    template: str,
    texts: Sequence[str],
    labels: Sequence[str],
    batch_size: int,
    max_length: int,
    trunk: TrunkCache | None = None,
) -> torch.Tensor:
    """Log-likelihood of every label after every text, written with ``template``: (N, C)."""
    prompts = [split_template(template, t, labels[0])[0] for t in texts]
    comps = [label_text(lab) for lab in labels]
    return score_candidates(model, tokenizer, prompts, comps, batch_size, max_length, trunk=trunk)


def best_labels(scores: torch.Tensor, labels: Sequence[str]) -> list[str]:
    """The label of each row's highest score: (N, C) scores over ``labels`` -> N labels (ties: the first)."""
    return [labels[j] for j in scores.argmax(dim=1).tolist()]


@torch.inference_mode()
def heldout_metrics(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    template: str,
    texts: Sequence[str],
    labels: Sequence[str],
    candidates: Sequence[str],
    batch_size: int,
    max_length: int,
) -> dict[str, float]:
    """Mean NLL per gold completion token and label log-likelihood accuracy among ``candidates``."""
    pairs = [split_template(template, t, lab) for t, lab in zip(texts, labels)]
    nll, count = 0.0, 0
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        logp, n = completion_logprobs(model, encode(tokenizer, [p for p, _ in chunk], [c for _, c in chunk], max_length))
        nll -= float(logp.sum())
        count += int(n.sum())
    scores = label_scores(model, tokenizer, template, texts, candidates, batch_size, max_length)
    pred = best_labels(scores, candidates)
    accuracy = sum(p == g for p, g in zip(pred, labels)) / len(labels)
    return {"loss": nll / count, "accuracy": accuracy}
