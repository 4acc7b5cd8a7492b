"""Prefect tasks of a knowledge-incorporation comparison (``kind: knowledge``; docs/design.md §5).

Every run (method x seed) lives in ``<evaluation.work_dir>/<name>/<method>/seed-<s>/``
like a continual one: its ``params.yaml``, ``result.json`` (kept, keyed by the run's
params, knowledge settings, code and passages file, so a rerun runs nothing again),
and while it runs ``progress.jsonl``: one line per passage done (single mode) or
learned (continued mode), each with the run's key, so an interrupted run resumes at
the passage it was on. A continued run also saves its memory state after every
passage (``state/``, its manifest records how many passages it has learned). The
dream tables of ``sleep`` and ``base_dreams`` go to ``dreams/passage-<i>.parquet``.
The ML is ``model/incorporation.py``; the dream gate (Great Expectations) is
``tasks/dream_gate.py``, passed in as a function.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from model.checkpoint import CheckpointError, load_state, open_memory_model, read_manifest, save_state
from model.config import DreamGateConfig, KnowledgeConfig, Params
from model.incorporation import METHODS, GateFn, Learned, run_continued, run_single
from model.io import atomic_path, write_json
from model.knowledge import Passage, select_passages
from tasks.compare import RESULT_FILE, Comparison, cached_result, run_key
from tasks.dream_gate import gate_dreams, validate_dreams

PROGRESS_FILE = "progress.jsonl"
STATE_DIR = "state"
DREAMS_DIR = "dreams"


def passages_path(root: Path, knowledge: KnowledgeConfig) -> Path:
    """The passages file, absolute (relative paths are under the project root)."""
    p = Path(knowledge.passages)
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


def knowledge_run_key(p: Params, method: str, kc: KnowledgeConfig, path: Path) -> str:
    """What a knowledge run's result depends on: its params, the knowledge settings, the code, the passages file."""
    return run_key(p, method, data=path, extra={"knowledge": kc.model_dump(mode="json")})


def _read_progress(rdir: Path, key: str) -> list[dict[str, Any]]:
    """The progress lines written with ``key`` (a line cut by a crash is skipped; another key: none kept)."""
    path = rdir / PROGRESS_FILE
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("key") != key:
            return []
        rows.append(row)
    return rows


def _write_progress(rdir: Path, rows: list[dict[str, Any]]) -> None:
    with atomic_path(rdir / PROGRESS_FILE) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _append_progress(rdir: Path, row: dict[str, Any]) -> None:
    with open(rdir / PROGRESS_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _save_dreams(rdir: Path, index: int, learned: Learned) -> None:
    if learned.dreams is not None:
        with atomic_path(rdir / DREAMS_DIR / f"passage-{index}.parquet") as tmp:
            learned.dreams.to_parquet(tmp, index=False)


def gate_function(cfg: DreamGateConfig) -> GateFn:
    """The sleep method's gate: the dream gate's Great Expectations suite (tasks/dream_gate.py)."""
    return lambda table: gate_dreams(table, validate_dreams(table, cfg))


@task(cache_policy=NO_CACHE)
def run_knowledge_method(
    p: Params, root: Path, rdir: Path, method: str, kc: KnowledgeConfig, passages: list[tuple[int, Passage]]
) -> dict[str, Any]:
    """One method on one seed over the passages (single or continued); writes result.json. Resumes mid-way."""
    log = get_run_logger()
    if method not in METHODS:
        raise ValueError(f"{method} is not a knowledge method; one of {', '.join(METHODS)}")
    key = knowledge_run_key(p, method, kc, passages_path(root, kc))
    hit = cached_result(rdir, key)
    if hit is not None:
        log.info(f"{method} seed {p.seed}: result on disk, not run again")
        return hit
    rdir.mkdir(parents=True, exist_ok=True)
    progress = _read_progress(rdir, key)
    torch.set_num_threads(p.wake.threads)
    lm, cms, _ = open_memory_model(p, root)
    cfg = p.dream
    gate = gate_function(cfg.gate) if method == "sleep" else None
    n = len(passages)

    if kc.mode == "single":
        done = {r["index"] for r in progress}
        _write_progress(rdir, progress)  # drops a line a crash cut short
        if done:
            log.info(f"{method} seed {p.seed}: {len(done)}/{n} passages on disk, resuming")

        def on_passage(row: dict[str, Any], learned: Learned) -> None:
            _save_dreams(rdir, row["index"], learned)
            _append_progress(rdir, {"key": key, **row})
            progress.append({"key": key, **row})
            log.info(f"{method} seed {p.seed} [{len(progress)}/{n}] passage {row['index']}: em {row['em']:.2f} "
                     f"f1 {row['f1']:.2f} tau {row['tau']:.3f} ({row['seconds']:.0f} s)")

        run_single(method, lm.model, lm.tokenizer, cms, passages, cfg, p.seed, gate, done, on_passage,
                   sampling=p.sampling)
        by_index = {r["index"]: {k: v for k, v in r.items() if k != "key"} for r in progress}
        rows = [by_index[i] for i, _ in passages]
        learning = rows
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
        _write_progress(rdir, progress)
        if start:
            log.info(f"{method} seed {p.seed}: {start}/{n} passages learned on disk, resuming")
        elif state.exists():
            shutil.rmtree(state)

        def on_learned(k: int, row: dict[str, Any], learned: Learned) -> None:
            _save_dreams(rdir, row["index"], learned)
            _append_progress(rdir, {"key": key, **row})  # first the line, then the state that says k are learned
            save_state(cms, state, metadata={"key": key, "learned": k})
            progress.append({"key": key, **row})
            extra = f" tau over learned {row['tau_learned']:.3f}" if "tau_learned" in row else ""
            log.info(f"{method} seed {p.seed}: learned {k}/{n} (passage {row['index']}){extra} ({row['seconds']:.0f} s)")

        rows = run_continued(method, lm.model, lm.tokenizer, cms, passages, cfg, p.seed, gate, start, kc.tau_every,
                             on_learned, sampling=p.sampling)
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


__all__ = ["PROGRESS_FILE", "gate_function", "knowledge_run_key", "prepare_passages", "run_knowledge_method"]
