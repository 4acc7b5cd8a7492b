"""Baselines for the continual-learning evaluation (docs/design.md §5), on wake's data and budget.

Every trained baseline reads one task's (prompt, completion) pairs exactly as wake
does (:func:`model.memory.wake.train_period`): the same order, ``batch_size`` examples per
step, ``epochs`` passes, the same SFT loss on completion tokens. The difference is
the optimiser (a plain AdamW over the given parameters, one step per batch) and what
is trained or added:

- sequential fine-tuning: :func:`train_sequential` over all weights, or over LoRA
  adapters from :func:`attach_lora` (Hu et al. 2021);
- EWC (Kirkpatrick et al. 2017): the quadratic ``penalty`` of
  :class:`model.evaluation.ewc.EWC` added to the loss;
- experience replay (Chaudhry et al. 2019, "tiny episodic memories"): each batch is
  extended with examples drawn from a :class:`ReplayBuffer` of past tasks;
- in-context learning: :func:`icl_prompt_prefix` + :func:`classify_in_context`, no training;
- zero-shot: :func:`model.memory.wake.label_scores` and :func:`model.memory.wake.best_labels` on the base model, no code here.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from model.memory.wake import (
    NonFiniteLossError,
    encode,
    label_text,
    score_candidates,
    sft_loss,
    split_template,
)

Pair = tuple[str, str]


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Fork the global torch RNG (and the device's, on CUDA) and seed it; restored on exit."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


# --- LoRA ----------------------------------------------------------------------------


def attach_lora(
    model: PreTrainedModel,
    r: int,
    alpha: float,
    targets: Sequence[str],
    dropout: float = 0.0,
    seed: int = 0,
) -> list[nn.Parameter]:
    """Add LoRA adapters (W x + alpha/r * B A x) to the linear submodules named ``targets``.

    ``targets`` are module-name suffixes such as ``["q_proj", "v_proj"]`` (PEFT's
    ``target_modules``); a name that matches nothing is a ValueError. The adapters are
    injected in place with ``peft.inject_adapter_in_model``, so ``model`` keeps its
    class and interface (``get_decoder``, ``get_output_embeddings``) that wake's
    scoring uses. A (r, d_in) is Kaiming-initialised from ``seed`` and B (d_out, r) is
    zero, so the model's outputs are unchanged until training. Every other parameter
    of the model (including any memory levels) is frozen. Returns the adapter
    parameters, the only ones with ``requires_grad``. Call once per model.
    """
    from peft import LoraConfig, inject_adapter_in_model

    if r < 1:
        raise ValueError(f"LoRA rank must be at least 1, got {r}")
    if not targets:
        raise ValueError("attach_lora needs at least one target module name")
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=dropout, bias="none")
    with _seeded(seed, model.device):
        inject_adapter_in_model(config, model)
    model.requires_grad_(False)
    params = [p for name, p in model.named_parameters() if ".lora_A." in name or ".lora_B." in name]
    if not params:
        raise ValueError(f"no LoRA parameters were created for targets {list(targets)}")
    for p in params:
        p.requires_grad_(True)
    return params


# --- Experience replay ---------------------------------------------------------------


class ReplayBuffer:
    """A fixed-size episodic memory filled by reservoir sampling (Vitter's algorithm R).

    After n examples have been offered, each one is in the buffer with probability
    capacity / n, whatever task it came from, so the memory stays a uniform sample of
    the whole stream (Chaudhry et al. 2019). Note that it stores raw past data (the
    prompt and completion text itself), which the sleep methods do not.
    """

    def __init__(self, capacity: int, seed: int = 0) -> None:
        if capacity < 0:
            raise ValueError(f"replay capacity must be non-negative, got {capacity}")
        self.capacity = capacity
        self.seen = 0
        self._items: list[Pair] = []
        self._rng = random.Random(seed)

    def add(self, pairs: Sequence[Pair]) -> None:
        """Offer each (prompt, completion) pair in order to the reservoir."""
        for pair in pairs:
            self.seen += 1
            if len(self._items) < self.capacity:
                self._items.append(tuple(pair))
            else:
                k = self._rng.randrange(self.seen)
                if k < self.capacity:
                    self._items[k] = tuple(pair)

    def sample(self, k: int, rng: random.Random) -> list[Pair]:
        """``min(k, len(self))`` distinct stored pairs, drawn uniformly with ``rng``."""
        return rng.sample(self._items, min(k, len(self._items)))

    @property
    def items(self) -> list[Pair]:
        """A copy of the stored pairs."""
        return list(self._items)

    def __len__(self) -> int:
        return len(self._items)


# --- Sequential training (fine-tuning, LoRA, EWC, replay) ------------------------------


@dataclass
class SequentialStep:
    """What one step of :func:`train_sequential` trained on and its losses."""

    step: int
    loss: float  # SFT loss of the (task + replay) batch, per completion token
    penalty: float  # value of the regulariser added to it (0.0 without one)
    prompts: list[str]
    completions: list[str]
    n_replayed: int  # the last n_replayed pairs of the batch came from the replay buffer


def train_sequential(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    params_to_train: Sequence[nn.Parameter],
    prompts: Sequence[str],
    completions: Sequence[str],
    batch_size: int,
    max_length: int,
    epochs: int,
    lr: float,
    grad_clip: float,
    penalty: Callable[[], torch.Tensor] | None = None,
    replay: Sequence[Pair] | None = None,
    replay_per_batch: int = 0,
    seed: int = 0,
    on_step: Callable[[SequentialStep], None] | None = None,
) -> list[float]:
    """Train on one task with AdamW, wake's batches and budget; return the SFT loss per step.

    Steps: for each epoch, the examples in the given order, ``batch_size`` at a time
    (``epochs * ceil(n / batch_size)`` steps, like wake). Each step minimises
    ``sft_loss + penalty()`` and takes one AdamW step over ``params_to_train`` (a fresh
    optimiser per call, i.e. per task) after clipping their gradient norm to
    ``grad_clip`` (no clipping when ``grad_clip <= 0``). With ``replay`` and
    ``replay_per_batch > 0`` every batch is extended with that many distinct pairs
    drawn uniformly from ``replay`` (experience replay; all of it when it is smaller).
    ``seed`` fixes the replay draws and any dropout; the global RNG is left as it was.
    Raises NonFiniteLossError on a NaN/inf loss. The returned losses exclude the penalty
    (``on_step`` receives both, and the batch). The model is left in eval mode.
    """
    params = list(params_to_train)
    if not params:
        raise ValueError("train_sequential needs at least one parameter to train")
    if any(not p.requires_grad for p in params):
        raise ValueError("every parameter to train must have requires_grad=True")
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    if batch_size < 1 or epochs < 1:
        raise ValueError(f"batch_size and epochs must be at least 1, got {batch_size} and {epochs}")
    if replay_per_batch < 0:
        raise ValueError(f"replay_per_batch must be non-negative, got {replay_per_batch}")
    replay = list(replay or [])
    n_replay = min(replay_per_batch, len(replay))
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(params, lr=lr)
    losses: list[float] = []
    model.train()
    try:
        with _seeded(seed, model.device):
            for _ in range(epochs):
                for start in range(0, len(prompts), batch_size):
                    batch_p = list(prompts[start : start + batch_size])
                    batch_c = list(completions[start : start + batch_size])
                    for p, c in rng.sample(replay, n_replay) if n_replay else []:
                        batch_p.append(p)
                        batch_c.append(c)
                    loss = sft_loss(model, encode(tokenizer, batch_p, batch_c, max_length))
                    reg = penalty() if penalty is not None else None
                    total = loss + reg if reg is not None else loss
                    if not math.isfinite(total.item()):
                        raise NonFiniteLossError(f"non-finite baseline loss {total.item()} at step {len(losses) + 1}")
                    optimizer.zero_grad(set_to_none=True)
                    total.backward()
                    if grad_clip > 0:
                        torch.nn.utils.clip_grad_norm_(params, grad_clip)
                    optimizer.step()
                    losses.append(float(loss.item()))
                    if on_step is not None:
                        on_step(SequentialStep(len(losses), losses[-1], float(reg.item()) if reg is not None else 0.0,
                                               batch_p, batch_c, n_replay))
    finally:
        optimizer.zero_grad(set_to_none=True)
        model.eval()
    return losses


# --- In-context learning ---------------------------------------------------------------


def icl_examples(texts: Sequence[str], labels: Sequence[str], k: int, seed: int = 0) -> list[Pair]:
    """Pick ``k`` (text, label) demonstrations per label, seeded, interleaved label by label.

    Labels appear in order of first occurrence; within a label the k texts are a
    seeded random choice. The result goes round-robin (one per label, k rounds) so no
    label's demonstrations are all at the end of the prompt (recency bias). A label
    with fewer than k texts is a ValueError.
    """
    if len(texts) != len(labels):
        raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    by_label: dict[str, list[str]] = {}
    for t, lab in zip(texts, labels):
        by_label.setdefault(lab, []).append(t)
    rng = random.Random(seed)
    chosen: dict[str, list[str]] = {}
    for lab, ts in by_label.items():
        if len(ts) < k:
            raise ValueError(f"label {lab!r} has {len(ts)} texts, fewer than k={k}")
        chosen[lab] = rng.sample(ts, k)
    return [(chosen[lab][r], lab) for r in range(k) for lab in chosen]


def icl_prompt_prefix(examples: Sequence[Pair], template: str) -> str:
    """The demonstrations as a prompt prefix: one ``template`` line per (text, label), each ending in a newline.

    Labels are written as the model sees them in wake (``label_text``), so with the
    default template a line reads ``"book a table -> restaurant reservation"``.
    """
    return "".join(template.format(text=text, label=label_text(label)) + "\n" for text, label in examples)


def classify_in_context(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    template: str,
    prefix: str,
    texts: Sequence[str],
    labels: Sequence[str],
    batch_size: int,
    max_length: int,
) -> list[str]:
    """Predict one of ``labels`` for each text by label log-likelihood after ``prefix``.

    The same scoring as :func:`model.memory.wake.label_scores`, with the demonstrations as the
    scorer's shared prefix (computed once into a KV cache for all texts). They must
    not be cut: if the prefix plus any prompt plus the longest label (and EOS) is
    longer than ``max_length`` tokens, a ValueError says how long it must be.
    """
    prompts = [split_template(template, t, labels[0])[0] for t in texts]
    comps = [label_text(lab) for lab in labels]
    n_prefix = len(tokenizer(prefix, add_special_tokens=True)["input_ids"])
    if n_prefix > max_length:
        raise ValueError(f"the in-context prefix alone has {n_prefix} tokens, more than max_length={max_length}")
    longest = max(len(c) for c in tokenizer(comps, add_special_tokens=False)["input_ids"]) + 1  # + EOS
    needed = n_prefix + max(len(p) for p in tokenizer(prompts, add_special_tokens=False)["input_ids"]) + longest
    if needed > max_length:
        raise ValueError(
            f"in-context prompts need max_length >= {needed} (prefix {n_prefix} tokens), got {max_length}"
        )
    scores = score_candidates(model, tokenizer, prompts, comps, batch_size, max_length, shared_prefix=prefix)
    return [labels[j] for j in scores.argmax(dim=1).tolist()]
