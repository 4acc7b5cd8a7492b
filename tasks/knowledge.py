"""Prefect tasks of a knowledge-incorporation comparison (``kind: knowledge``; docs/design.md §5).

Every run (method x seed) lives in ``<evaluation.work_dir>/<name>/<method>/seed-<s>/``
like a continual one: its ``params.yaml``, ``result.json`` (kept, keyed by the run's
params, knowledge settings, code and passages file, so a rerun runs nothing again),
and while it runs ``progress.jsonl``: one line per passage done (single mode) or
learned (continued mode), each with the run's key, so an interrupted run resumes at
the passage it was on. A continued run also saves its memory state after every
passage (``state/``, its manifest records how many passages it has learned). The
dream tables of ``sleep`` and ``base_dreams`` go to ``dreams/passage-<i>.parquet``.
The ML is ``model/evaluation/incorporation.py``; the dream gate (Great Expectations) is
``checks/dreams.py``, passed in as a function.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from tqdm.auto import tqdm
from prefect.cache_policies import NO_CACHE

from checks import gate_dreams, validate_dreams
from model.config import DreamGateConfig, KnowledgeConfig, Params
from model.data.stream import DataError
from model.decoding.loading import load_base_model
from model.evaluation.incorporation import (
    GATED_METHODS,
    METHODS,
    TRAINED_POLICY_METHODS,
    GateFn,
    Learned,
    Reader,
    fresh_fast_expert,
    uses_passage_experts,
)
from model.evaluation.incorporation_runs import run_continued, run_single
from model.evaluation.knowledge import Passage, select_passages
from model.io import append_line, atomic_path, exclusive, read_keyed_lines, write_json, write_lines
from model.memory.checkpoint import CheckpointError, load_state, open_memory_model, read_manifest, save_state
from model.runtime import configure_torch
from model.sleep.dream_policy import POLICY_JSON, DreamPolicyError, load_policy, read_policy, save_policy
from model.sleep.dreaming import task_from_passage
from model.sleep.policy_training import train_policy
from tasks.compare import RESULT_FILE, Comparison, cached_result, run_key

PROGRESS_FILE = "progress.jsonl"
STATE_DIR = "state"
DREAMS_DIR = "dreams"
POLICY_DIR = "policy"  # a trained dream policy (model/sleep/dream_policy.py), in <work_dir>/<name>/policy/seed-<s>/
ROUNDS_FILE = "rounds.jsonl"


def passages_path(root: Path, knowledge: KnowledgeConfig | str) -> Path:
    """The passages file (of a knowledge config, or given as a path), absolute: relative paths are under the
    project root."""
    p = Path(knowledge if isinstance(knowledge, str) else knowledge.passages)
    return p if p.is_absolute() else (root / p).resolve()


@task(cache_policy=NO_CACHE)
def prepare_passages(root: Path, comp: Comparison) -> list[tuple[int, Passage]]:
    """The comparison's (index, passage) pairs, checked before anything trains.

    A missing or malformed file, or ``offset + n_passages`` beyond the file, raises
    DataError naming the file and the field.
    """
    kc = comp.knowledge
    if kc is None:
        raise ValueError(f"comparison {comp.name!r} is not a knowledge comparison")
    path = passages_path(root, kc)
    chosen = select_passages(path, kc.n_passages, kc.offset, f"evaluation.comparisons.{comp.name}.knowledge")
    get_run_logger().info(f"{comp.name}: {kc.mode} mode, passages {kc.offset}..{kc.offset + kc.n_passages - 1} of "
                          f"{path.name} ({sum(len(p.questions) for _, p in chosen)} questions)")
    return chosen


def knowledge_run_key(p: Params, method: str, kc: KnowledgeConfig, path: Path, policy_sha256: str | None = None) -> str:
    """What a knowledge run's result depends on: its params, the knowledge settings, the code, the passages file
    (and the trained dream policy's weights, for a method that dreams with one). Not the device it runs on, nor
    where the trained policy lies: shards on a GPU and an assembling run on the CPU share their passages."""
    extra: dict[str, Any] = {"knowledge": kc.model_dump(mode="json")}
    if policy_sha256 is not None:
        extra["policy_sha256"] = policy_sha256
    neutral = p.for_run({"model": {"device": "cpu"}, "dream": {"policy": {"source": None}}}, "the run key")
    return run_key(neutral, method, data=path, extra=extra)


def _save_dreams(rdir: Path, index: int, learned: Learned) -> None:
    if learned.dreams is not None:
        with atomic_path(rdir / DREAMS_DIR / f"passage-{index}.parquet") as tmp:
            learned.dreams.to_parquet(tmp, index=False)


def gate_function(cfg: DreamGateConfig) -> GateFn:
    """The sleep method's gate: the dream gate's Great Expectations suite (checks/dreams.py)."""
    return lambda table: gate_dreams(table, validate_dreams(table, cfg))


@task(cache_policy=NO_CACHE)
def run_knowledge_method(
    p: Params, root: Path, rdir: Path, method: str, kc: KnowledgeConfig, passages: list[tuple[int, Passage]],
    policy_sha256: str | None = None, shard: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """One method on one seed over the passages (single or continued); writes result.json. Resumes mid-way.

    A method that dreams with a trained policy gets it through ``p.dream.policy.source`` and its digest
    ``policy_sha256`` (part of the run's key). ``shard`` = (i, n) (single mode): only the passages at
    positions i, i + n, ... are run, their lines go to ``progress.shard-<i>-of-<n>.jsonl`` and no result.json
    is written; a run without ``shard`` counts every shard's finished passages as done."""
    log = get_run_logger()
    if method not in METHODS:
        raise ValueError(f"{method} is not a knowledge method; one of {', '.join(METHODS)}")
    key = knowledge_run_key(p, method, kc, passages_path(root, kc), policy_sha256)
    hit = cached_result(rdir, key)
    if hit is not None:
        log.info(f"{method} seed {p.seed}: result on disk, not run again")
        return hit
    rdir.mkdir(parents=True, exist_ok=True)
    progress_file = rdir / (PROGRESS_FILE if shard is None else f"progress.shard-{shard[0]}-of-{shard[1]}.jsonl")
    progress = read_keyed_lines(progress_file, key)
    configure_torch(p.wake.threads, p.wake.deterministic)
    lm, cms, _ = open_memory_model(p, root)
    cfg = p.dream
    gate = gate_function(cfg.gate) if method in GATED_METHODS else None
    reader = Reader(lm.model, lm.tokenizer, cms, cfg, p.seed, gate, p.sampling)
    n = len(passages)

    if kc.mode == "single":
        write_lines(progress_file, progress)  # drops a line a crash cut short
        if shard is None:  # what the shards finished counts as done
            for other in sorted(rdir.glob("progress.shard-*.jsonl")):
                known = {r["index"] for r in progress}
                progress += [r for r in read_keyed_lines(other, key) if r["index"] not in known]
        mine = passages if shard is None else [ip for k, ip in enumerate(passages) if k % shard[1] == shard[0]]
        done = {r["index"] for r in progress}
        n = len(mine)
        if done & {i for i, _ in mine}:
            log.info(f"{method} seed {p.seed}: {len(done & {i for i, _ in mine})}/{n} passages on disk, resuming")

        def on_passage(row: dict[str, Any], learned: Learned) -> None:
            _save_dreams(rdir, row["index"], learned)
            append_line(progress_file, {"key": key, **row})
            progress.append({"key": key, **row})
            log.info(f"{method} seed {p.seed} [{len(progress)}/{len(passages)}] passage "
                     f"{row['index']}: em {row['em']:.2f} f1 {row['f1']:.2f} tau {row['tau']:.3f} ({row['seconds']:.0f} s)")

        run_single(method, reader, mine, done, on_passage)
        by_index = {r["index"]: {k: v for k, v in r.items() if k != "key"} for r in progress}
        rows = [by_index[i] for i, _ in mine]
        learning = rows
        if shard is not None:  # a share of the passages: no result.json (the assembling run writes it)
            return {"method": method, "seed": p.seed, "key": key, "kind": "knowledge", "mode": kc.mode,
                    "passages": rows, "seconds": round(sum(float(r["seconds"]) for r in rows), 1), "shard": list(shard)}
    else:
        state = rdir / STATE_DIR
        start = 0
        if progress and state.is_dir():
            try:
                meta = read_manifest(state)["metadata"]
                if meta.get("key") == key:
                    load_state(cms, state)
                    start = int(meta["learned"])
            except (CheckpointError, KeyError, ValueError, OSError):
                start = 0
        progress = [r for r in progress if r["learned"] <= start] if start else []
        write_lines(progress_file, progress)
        if start:
            log.info(f"{method} seed {p.seed}: {start}/{n} passages learned on disk, resuming")
        elif state.exists():
            shutil.rmtree(state)

        def on_learned(k: int, row: dict[str, Any], learned: Learned) -> None:
            _save_dreams(rdir, row["index"], learned)
            append_line(progress_file, {"key": key, **row})  # first the line, then the state that says k are learned
            save_state(cms, state, metadata={"key": key, "learned": k})
            progress.append({"key": key, **row})
            extra = f" tau over learned {row['tau_learned']:.3f}" if "tau_learned" in row else ""
            log.info(f"{method} seed {p.seed}: learned {k}/{n} (passage {row['index']}){extra} ({row['seconds']:.0f} s)")

        experts = uses_passage_experts(method, kc.passage_experts)
        if experts and start == 0:
            log.info(f"{method} seed {p.seed}: each passage into its own read-only expert, questions routed to it")
        rows = run_continued(method, reader, passages, start, kc.tau_every, on_learned, experts=experts)
        learning = [{k: v for k, v in r.items() if k != "key"} for r in progress]

    funnel: dict[str, int] = {}
    for r in learning:
        for k, v in (r.get("funnel") or {}).items():
            funnel[k] = funnel.get(k, 0) + int(v)
    result = {
        "method": method, "seed": p.seed, "key": key, "kind": "knowledge", "mode": kc.mode, "passages": rows,
        "gradient_steps": sum(int(r["gradient_steps"]) for r in learning),
        "seconds": round(sum(float(r["seconds"]) for r in learning) + (0.0 if kc.mode == "single" else
                                                                       sum(float(r["seconds"]) for r in rows)), 1),
        "funnel": funnel or None,
        "tau_curve": [[r["learned"], r["tau_learned"]] for r in learning if "tau_learned" in r],
    }
    write_json(rdir / RESULT_FILE, result)
    return result


def training_passages(root: Path, kc: KnowledgeConfig, evaluation: list[tuple[int, Passage]]) -> list[tuple[int, Passage]]:
    """The policy's training pool (``knowledge.policy_training``), checked to share no passage with ``evaluation``.

    A passage of the pool whose text is an evaluation passage's is a DataError naming both: the policy
    must never train on what it is evaluated on.
    """
    pt = kc.policy_training
    path = passages_path(root, pt.passages)
    pool = select_passages(path, pt.n_passages, pt.offset, "knowledge.policy_training")
    seen = {" ".join(p.context.split()): i for i, p in evaluation}
    for i, p in pool:
        j = seen.get(" ".join(p.context.split()))
        if j is not None:
            raise DataError(f"{path}: passage {i} ({p.title}) is evaluation passage {j} of "
                            f"{passages_path(root, kc).name}: knowledge.policy_training must not train on the evaluation")
    return pool


def policy_dir(rdir_root: Path, seed: int) -> Path:
    """Where the trained policy of ``seed`` lives: ``<comparison dir>/policy/seed-<s>/``."""
    return rdir_root / POLICY_DIR / f"seed-{seed}"


@task(cache_policy=NO_CACHE)
def train_dream_policy(p: Params, root: Path, pdir: Path, kc: KnowledgeConfig,
                       evaluation: list[tuple[int, Passage]]) -> dict[str, Any]:
    """Train the dream policy by ReST-EM on the training pool (model/sleep/policy_training.py); resumable per round.

    Writes ``pdir/policy/`` (the policy after the last update: dream_policy.json + .safetensors), ``rounds.jsonl``
    (a line per measurement, train and eval split, with the run's key) and ``result.json``; the plot is the
    report's (``policy_rounds.png``). The eval split is the first ``eval_passages`` evaluation passages, only
    measured (the policy frozen), never trained on. Shards of a comparison that all need the policy wait for the
    one that trains it (a lock on ``pdir``) and then read it from disk.
    """
    with exclusive(pdir, "dream policy training", wait=True):
        return _train_dream_policy(p, root, pdir, kc, evaluation)


def _train_dream_policy(p: Params, root: Path, pdir: Path, kc: KnowledgeConfig,
                        evaluation: list[tuple[int, Passage]]) -> dict[str, Any]:
    log = get_run_logger()
    pt = kc.policy_training
    pool = training_passages(root, kc, evaluation)
    held = evaluation[: pt.eval_passages]
    key = run_key(p, "policy_training", data=passages_path(root, pt.passages),
                  extra={"policy_training": pt.model_dump(mode="json"), "eval": [i for i, _ in held]})
    hit = cached_result(pdir, key)
    if hit is not None:
        log.info(f"dream policy, seed {p.seed}: trained on disk ({hit['policy_rounds']} rounds), not run again")
        return hit
    pdir.mkdir(parents=True, exist_ok=True)
    rounds = read_keyed_lines(pdir / ROUNDS_FILE, key)
    configure_torch(p.wake.threads, p.wake.deterministic)
    lm, cms, _ = open_memory_model(p, root)
    fresh_fast_expert(cms, origin="policy training")  # the trials' state: as every evaluation passage starts
    done = {int(r["round"]) for r in rounds if r["split"] == "train"}
    start = 0
    if (pdir / POLICY_DIR / POLICY_JSON).is_file():
        try:
            meta, _ = read_policy(pdir / POLICY_DIR, cms.dream_policy.base_model, cms.dream_policy.cfg)
            start = int(meta["rounds"])
        except DreamPolicyError as e:
            log.warning(f"dream policy, seed {p.seed}: {e}; training again from round 0")
    if start and (not set(range(start)) <= done or start > pt.rounds):  # lines lost with a crash: start over
        start = 0
    if start:
        load_policy(cms.dream_policy, pdir / POLICY_DIR)
    rounds = [r for r in rounds if int(r["round"]) < start]
    write_lines(pdir / ROUNDS_FILE, rounds)
    if start:
        log.info(f"dream policy, seed {p.seed}: {start}/{pt.rounds} rounds on disk, resuming")
    cfg = p.dream
    train_tasks = [task_from_passage(q, f"train{i}", cfg) for i, q in pool]
    eval_tasks = [task_from_passage(q, f"passage{i}", cfg) for i, q in held]

    def on_round(r: int, measured: list) -> None:
        if r < pt.rounds:  # first the policy this round made, then the lines that say the round is done
            save_policy(cms.dream_policy, pdir / POLICY_DIR)
        for st in measured:
            line = {"key": key, **st.to_dict()}
            append_line(pdir / ROUNDS_FILE, line)
            rounds.append(line)
            log.info(f"dream policy, seed {p.seed}, round {st.round} ({st.split}): {st.rewarded}/{st.dreams} dreams "
                     f"rewarded ({st.share_rewarded:.2f}), mean tau gain {st.mean_tau_gain:+.4f}, {st.tokens} tokens "
                     f"({st.seconds:.0f} s)")

    per_round = len(train_tasks) + len(eval_tasks)
    bar = tqdm(total=(pt.rounds + 1 - start) * per_round, desc=f"dream policy, seed {p.seed}", unit="passage", leave=False)
    try:
        train_policy(lm.model, lm.tokenizer, cms, train_tasks, eval_tasks, cfg, pt, p.seed, start, on_round,
                     sampling=p.sampling, on_passage=lambda split, done, total: bar.update(1))
    finally:
        bar.close()
    result = {"key": key, "seed": p.seed, "policy": str(pdir / POLICY_DIR), "policy_rounds": cms.dream_policy.rounds,
              "policy_sha256": cms.dream_policy.digest(), "training_passages": [i for i, _ in pool],
              "eval_passages": [i for i, _ in held],
              "rounds": [{k: v for k, v in r.items() if k != "key"} for r in rounds]}
    write_json(pdir / RESULT_FILE, result)
    return result


def warm_model(p: Params, root: Path) -> str:
    """Load the run's base model once, so that processes started after this one read the converted model from
    the cache instead of each converting the embedded GGUF at the same time (flows/knowledge_shards.py)."""
    return load_base_model(p.model, root).name


def trains_a_policy(method: str) -> bool:
    """Whether ``method`` first trains a dream policy over the training pool (ReST-EM, once per seed)."""
    return method in TRAINED_POLICY_METHODS


__all__ = ["POLICY_DIR", "PROGRESS_FILE", "policy_dir", "train_dream_policy", "trains_a_policy", "training_passages", "gate_function", "knowledge_run_key", "prepare_passages", "run_knowledge_method", "warm_model"]
