"""Prefect tasks of a wake period: thin wrappers over ``model/`` that read and write files."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pandas as pd
import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from tqdm.auto import tqdm

from model.config import Params
from model.data.stream import PASSAGE_LABEL, load_plan, load_stream, task_file
from model.errors import UserError
from model.evaluation.knowledge import stream_pairs
from model.io import write_json
from model.memory.checkpoint import open_memory_model, read_manifest, save_state
from model.memory.prototypes import learn_prototypes
from model.memory.wake import NonFiniteLossError, StepLog, ensure_writable, train_period
from model.runtime import configure_torch
from tasks.caching import OUTPUT_STATE, cache_options, stamp_output


TIMING = "timing"  # the key of a task result's wall-clock measures (written apart from the metrics)


class StreamError(UserError, ValueError):
    """The prepared stream is missing or does not fit the requested period."""


@task(retries=2, retry_delay_seconds=1, cache_policy=NO_CACHE)
def read_stream(data_dir: Path, period: int | None = None) -> tuple[pd.DataFrame, dict[int, list[str]]]:
    """Read the prepared stream (parquet) and its task plan (JSON); with ``period``, only that task's shard."""
    return load_stream(data_dir) if period is None else load_stream(data_dir, period)


@task(retries=2, retry_delay_seconds=1, cache_policy=NO_CACHE)
def read_plan(data_dir: Path) -> dict[int, list[str]]:
    """Read the task plan alone (label names per task): all that a sleep knows of earlier tasks."""
    return load_plan(data_dir)


def wake_state_dir(params: Params, root: Path, period: int) -> Path:
    return root / params.wake.state_dir / f"period-{period}"


def consolidated_state_dir(params: Params, root: Path, period: int) -> Path:
    return root / params.consolidation.state_dir / f"period-{period}"


def sleep_state_dir(params: Params, root: Path, period: int) -> Path:
    return root / params.dream.state_dir / f"period-{period}"


def timings_path(params: Params, root: Path, stage: str, period: int) -> Path:
    return root / params.lifecycle.timings_dir / f"{stage}-period-{period}.json"


def _wake_inputs(params: Params, root: Path, period: int) -> list[Path]:
    prev = [sleep_state_dir(params, root, period - 1)] if period > 0 else []
    return [task_file(root / params.data.out_dir, period), *prev]


@task(**cache_options(_wake_inputs))
def train_wake_period(params: Params, root: Path, stream: pd.DataFrame, period: int) -> dict:
    """Train the memory levels on one period's examples; save the state; return training logs."""
    log = get_run_logger()
    configure_torch(params.wake.threads, params.wake.deterministic)
    torch.manual_seed(params.seed * 100_003 + period)
    rows = stream[(stream["task"] == period) & (stream["split"] == "train")].sort_values("row_id")
    if rows.empty:
        raise StreamError(f"period {period}: the stream has no train rows for task {period}")
    prev = sleep_state_dir(params, root, period - 1) if period > 0 else None
    if prev is not None and not prev.is_dir():
        raise StreamError(f"{prev}: missing; wake period {period} starts from the sleep after period {period - 1}")
    loaded, cms, optimizer = open_memory_model(params, root, prev, with_optimizer=True)
    prev_meta = read_manifest(prev)["metadata"] if prev else {}
    # Routing negatives: the inputs the last sleep dreamed about every task so far (model-written, no examples).
    negatives = [d["text"] for d in prev_meta.get("dreamed_inputs", [])]
    step_before = cms.step
    cms.begin_period(period)  # experts that learn now belong to this period (prototype routing)
    ensure_writable(cms, params.cms.levels, origin=f"wake:period-{period}")
    texts, labels = list(rows["text"]), list(rows["label"])
    # Labelled rows as template pairs, plain passages (the inbox's) as pieces to continue from their beginning.
    pairs, origin = stream_pairs(loaded.tokenizer, params.wake.template, texts, labels, params.wake.max_length)
    if not pairs:
        raise StreamError(f"period {period}: nothing to learn (every passage of its train rows has fewer than two words)")
    pieces = sum(labels[i] == PASSAGE_LABEL for i in origin)
    n_steps = params.wake.epochs * -(-len(pairs) // params.wake.batch_size)
    bar = tqdm(total=n_steps, desc=f"wake period {period}", unit="step", leave=False)

    def on_step(s: StepLog) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{s.loss:.3f}")

    start = time.perf_counter()
    try:
        logs = train_period(
            loaded.model,
            loaded.tokenizer,
            optimizer,
            [p for p, _ in pairs],
            [c for _, c in pairs],
            params.wake.batch_size,
            params.wake.max_length,
            params.wake.epochs,
            on_step,
            negatives=negatives,
            route_weight=params.cms.routing.weight if params.cms.routing.enabled else 0.0,
            negatives_per_step=params.cms.routing.negatives_per_step,
            seed=params.seed * 100_003 + period,
        )
    except NonFiniteLossError as e:
        raise NonFiniteLossError(f"{e}; state of period {period} not saved") from None
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    tokens = sum(s.tokens for s in logs)
    routing = params.cms.routing
    if routing.by_prototype:  # where this period's inputs lie: the router of its experts
        learn_prototypes(loaded.model, loaded.tokenizer, cms, [p for p, _ in pairs], period, routing.feature_layer,
                         routing.prototypes_per_period, params.wake.eval_batch_size, params.wake.max_length,
                         seed=params.seed * 100_003 + period, metric=routing.metric, shrinkage=routing.shrinkage,
                         groups=[None if labels[i] == PASSAGE_LABEL else str(labels[i]) for i in origin],
                         feature=routing.feature)
    else:
        cms.prototypes = None
    out = wake_state_dir(params, root, period)
    picks = random.Random(params.seed * 7_919 + period).sample(range(len(pairs)), min(len(pairs), params.consolidation.prompt_buffer_size))
    buffer = [pairs[i][0] for i in picks]
    # The labelled ones as (text, label): the sleep writes its dreams in their style (rehearsal.shots).
    examples = [[str(texts[origin[i]]), str(labels[origin[i]])] for i in picks if labels[origin[i]] != PASSAGE_LABEL]
    metadata = {"period": period, "task": period, "model": loaded.name, "step_before": step_before,
                "prompt_buffer": buffer, "buffer_examples": examples}
    passage_periods = prev_meta.get("passage_periods", []) + ([period] if pieces else [])
    if passage_periods:  # the periods that read passages (a sleep does not rehearse a period of passages only)
        metadata["passage_periods"] = passage_periods
    save_state(cms, out, optimizer, metadata=metadata)
    updates = {lvl.name: sum(li in s.updated_levels for s in logs) for li, lvl in enumerate(params.cms.levels)}
    log.info(f"period {period}: {len(logs)} steps, loss {logs[0].loss:.3f} -> {logs[-1].loss:.3f}, "
             f"{tokens / seconds:.0f} tokens/s, level updates {updates}")
    return stamp_output({
        "steps": len(logs),
        "cms_step": cms.step,
        "tokens": tokens,
        "loss_first": logs[0].loss,
        "loss_last": logs[-1].loss,
        "loss_mean": sum(s.loss for s in logs) / len(logs),
        "losses": [round(s.loss, 5) for s in logs],
        "level_updates": updates,
        "routing_negatives": len(negatives),
        **({"passage_pieces": pieces} if pieces else {}),
        "state_dir": str(out.relative_to(root)),
        TIMING: {"train_seconds": round(seconds, 3), "tokens_per_second": round(tokens / seconds, 1)},
    }, out)


@task(retries=2, retry_delay_seconds=1)
def write_metrics(path: Path, result: dict, timings: Path) -> Path:
    """Write a task's result as its metrics JSON, atomically; its ``timing`` entry goes to ``timings``.

    Metrics are a function of the params, the seed and the inputs, so a rerun writes the same
    bytes and DVC sees nothing change downstream; wall-clock times differ at every run.
    """
    write_json(timings, result.get(TIMING, {}))
    return write_json(path, {k: v for k, v in result.items() if k not in (TIMING, OUTPUT_STATE)})
