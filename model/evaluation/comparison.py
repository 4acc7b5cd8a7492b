"""The baselines of a comparison run over a class-incremental stream (docs/design.md §5).

Every method sees the same stream: task after task, each task's train rows in the
stream's order, ``wake.epochs`` passes in batches of ``wake.batch_size``. After each
task, accuracy on the test rows of every task seen so far, each text classified
among the labels of all seen tasks by label log-likelihood (class-incremental, as
the lifecycle's evaluate stage does). The CMS methods (cms, sleep and its ablations)
run the lifecycle's own wake/sleep/evaluate code instead; see ``flows/compare.py``.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from model.config import BaselinesConfig, Params, WakeConfig
from model.data.stream import build_stream, load_source
from model.evaluation.baselines import (
    ReplayBuffer,
    attach_lora,
    classify_in_context,
    icl_examples,
    icl_prompt_prefix,
    train_sequential,
)
from model.evaluation.ewc import EWC
from model.evaluation.prototype_classifier import PrototypeClassifier
from model.memory.wake import best_labels, label_scores, split_template

BASELINES = ("zero_shot", "icl", "finetune", "ewc", "replay", "joint", "sentence_lda")


@dataclass
class BaselineRun:
    """One baseline on one stream: accuracy on the seen tasks after each task, and its cost."""

    method: str
    accuracy: list[dict[str, float]] = field(default_factory=list)  # period i -> {task j: acc}
    gradient_steps: int = 0
    losses: list[list[float]] = field(default_factory=list)  # per period
    seconds: float = 0.0


def task_pairs(stream: pd.DataFrame, task: int, split: str) -> list[tuple[str, str]]:
    """(text, label) of one task's rows of a split, in stream order."""
    rows = stream[(stream["task"] == task) & (stream["split"] == split)].sort_values("row_id")
    return list(zip(rows["text"], rows["label"]))


def seen_accuracy(
    predict: Callable[[list[str], list[str]], list[str]], stream: pd.DataFrame, plan: dict[int, list[str]], period: int
) -> dict[str, float]:
    """Accuracy on the test rows of tasks 0..period, each among all seen labels: {task: acc}."""
    labels = [lab for t in range(period + 1) for lab in plan[t]]
    out = {}
    for t in range(period + 1):
        pairs = task_pairs(stream, t, "test")
        if not pairs:
            raise ValueError(f"task {t} has no test rows")
        pred = predict([x for x, _ in pairs], labels)
        out[str(t)] = sum(p == y for p, (_, y) in zip(pred, pairs)) / len(pairs)
    return out


def seen_train(stream: pd.DataFrame, period: int) -> list[tuple[str, str]]:
    """(text, label) of the train rows of tasks 0..period."""
    return [p for t in range(period + 1) for p in task_pairs(stream, t, "train")]


def run_baseline(
    method: str,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    stream: pd.DataFrame,
    plan: dict[int, list[str]],
    wake: WakeConfig,
    cfg: BaselinesConfig,
    seed: int,
    on_period: Callable[[int, dict[str, float]], None] | None = None,
) -> BaselineRun:
    """Run ``method`` (one of BASELINES) over the whole stream, task after task.

    ``finetune``/``ewc``/``replay`` train LoRA adapters (the base stays frozen) with the
    wake's batches, epochs and example order; ``ewc`` adds its penalty from the second
    task on (Fisher of every earlier task, online); ``replay`` adds ``replay_per_batch``
    examples from a reservoir of everything seen before the current task.
    ``zero_shot`` and ``icl`` never train. ``joint`` is the upper bound: after task i it is the
    same initial adapters trained on the train rows of tasks 0..i at once (shuffled), with as
    many steps as the sequential methods took up to task i; it keeps all raw data. ``sentence_lda`` trains no
    weight and keeps no raw data: a streaming LDA on the sentence model's embedding (model/evaluation/prototype_classifier.py).
    """
    if method not in BASELINES:
        raise ValueError(f"unknown baseline {method!r}; one of {', '.join(BASELINES)}")
    start = time.perf_counter()
    run = BaselineRun(method)
    torch.manual_seed(seed)
    params: list[torch.nn.Parameter] = []
    if method in ("finetune", "ewc", "replay", "joint"):
        params = attach_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_targets, seed=seed)
    initial = [p.detach().clone() for p in params]
    ewc = EWC(params, cfg.ewc_lambda) if method == "ewc" else None
    buffer = ReplayBuffer(cfg.replay_buffer, seed=seed) if method == "replay" else None
    lda = PrototypeClassifier(cfg.lda_shrinkage, wake.eval_batch_size) if method == "sentence_lda" else None

    def predict(texts: list[str], labels: list[str]) -> list[str]:
        scores = label_scores(model, tokenizer, wake.template, texts, labels, wake.eval_batch_size, wake.max_length)
        return best_labels(scores, labels)

    for period in sorted(plan):
        pairs = [split_template(wake.template, x, y) for x, y in task_pairs(stream, period, "train")]
        if not pairs:
            raise ValueError(f"task {period} has no train rows")
        if method == "joint":  # the upper bound: every task so far at once, from the same initial adapters
            pairs = [split_template(wake.template, x, y) for x, y in seen_train(stream, period)]
            random.Random(seed * 1_000 + period).shuffle(pairs)
            with torch.no_grad():
                for p, v in zip(params, initial):
                    p.copy_(v)
        if params:
            losses = train_sequential(
                model, tokenizer, params, [p for p, _ in pairs], [c for _, c in pairs], wake.batch_size,
                wake.max_length, wake.epochs, cfg.lr, wake.grad_clip,
                penalty=ewc.penalty if ewc is not None and period > 0 else None,
                replay=buffer.items if buffer is not None and len(buffer) else None,
                replay_per_batch=cfg.replay_per_batch, seed=seed * 1_000 + period,
            )
            run.losses.append(losses)
            # joint's model after the last task took as many steps as the sequential methods in all
            run.gradient_steps = len(losses) if method == "joint" else run.gradient_steps + len(losses)
            if ewc is not None:
                ewc.consolidate(model, tokenizer, [p for p, _ in pairs], [c for _, c in pairs],
                                cfg.ewc_fisher_batch_size, wake.max_length)
            if buffer is not None:
                buffer.add(pairs)
        if lda is not None:
            lda.learn([p for p, _ in pairs], [y for _, y in task_pairs(stream, period, "train")], period,
                      seed=seed * 100_003 + period)
            acc = seen_accuracy(lambda texts, labels: lda.predict(
                [split_template(wake.template, x, labels[0])[0] for x in texts], labels), stream, plan, period)
        elif method == "icl":
            seen = seen_train(stream, period)
            demos = icl_examples([x for x, _ in seen], [y for _, y in seen], cfg.icl_shots_per_label, seed)
            prefix = icl_prompt_prefix(demos, wake.template)

            def predict_icl(texts: list[str], labels: list[str]) -> list[str]:
                return classify_in_context(model, tokenizer, wake.template, prefix, texts, labels,
                                           wake.eval_batch_size, cfg.icl_max_length)

            acc = seen_accuracy(predict_icl, stream, plan, period)
        else:
            acc = seen_accuracy(predict, stream, plan, period)
        run.accuracy.append(acc)
        if on_period is not None:
            on_period(period, acc)
    run.seconds = time.perf_counter() - start
    return run


def evaluation_labels(params: Params, root: Path) -> set[str]:
    """Every label that a seed of a continual comparison of ``params`` puts in its stream: what development
    streams (learning-rate search, routing probe) must never use."""
    sources: dict[str, pd.DataFrame] = {}
    labels: set[str] = set()
    for name, comp in params.evaluation.comparisons.items():
        if comp.kind != "continual":
            continue
        base = params.for_run(comp.overrides, f"evaluation.comparisons.{name}.overrides")
        key = base.data.source.model_dump_json()
        if key not in sources:
            sources[key] = load_source(base.data.source, root)
        source = sources[key]
        for seed in comp.seeds:
            _, plan = build_stream(source, base.data.model_copy(update={"seed": seed}))
            labels.update(lab for task in plan.values() for lab in task)
    return labels


def check_stream(stream: pd.DataFrame, plan: dict[int, list[str]], where: str) -> None:
    """Refuse a stream a comparison cannot run on, before anything trains (names ``where``)."""
    for t, labels in plan.items():
        if not labels:
            raise ValueError(f"{where}: task {t} has no labels")
        for split in ("train", "test"):
            if stream[(stream["task"] == t) & (stream["split"] == split)].empty:
                raise ValueError(f"{where}: task {t} has no {split} rows (an empty task)")
