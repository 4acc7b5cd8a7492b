"""Prefect tasks of a long-context comparison (issue #16): build the documents, run one method on one seed.

The documents (model/evaluation/long_context.py) are built once per seed from the bAbI files, the needles
and the distractor prose, checked before anything trains; every method then reads each document
from the same fresh state and answers its question (model/evaluation/long_context_methods.py). A run writes
one progress line per document, so an interrupted run resumes at the next document.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from pathlib import Path
from typing import Any

import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from tqdm.auto import tqdm

from model.config import BaselinesConfig, LongContextConfig, Params
from model.data.stream import DataError
from model.decoding.loading import load_base_model, resolve_device
from model.evaluation.baselines import attach_lora
from model.evaluation.incorporation import MemorySnapshot
from model.evaluation.long_context import (
    DEV_NEEDLE_SEED,
    Document,
    Item,
    build_document,
    load_babi,
    load_distractors,
    needle_items,
)
from model.evaluation.long_context_methods import (
    METHODS,
    Reading,
    answer_facts_only,
    answer_from_memory,
    answer_in_context,
    answer_retrieval,
    document_pieces,
    read_cms,
    read_lora,
    sleep_levels,
    slow_levels,
)
from model.io import append_line, read_keyed_lines, write_json, write_lines
from model.memory.checkpoint import open_memory_model
from model.runtime import configure_torch
from model.sleep.rewards import SemanticJudge
from tasks.compare import RESULT_FILE, Comparison, cached_result, run_key

PROGRESS_FILE = "progress.jsonl"


def _root_path(root: Path, path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else (root / p).resolve()


def babi_file(root: Path, lc: LongContextConfig, name: str) -> Path:
    """The bAbI file of task ``name`` for the split: ``<babi_dir>/<name>_*_test.txt`` (dev: ``_train.txt``)."""
    folder = _root_path(root, lc.babi_dir)
    suffix = "train" if lc.split == "dev" else "test"
    found = sorted(folder.glob(f"{name}_*_{suffix}.txt"))
    if len(found) != 1:
        raise DataError(f"{folder}: expected one file {name}_*_{suffix}.txt for long_context.tasks '{name}', "
                        f"found {len(found)}")
    return found[0]


def draw_items(root: Path, lc: LongContextConfig, seed: int) -> list[Item]:
    """``items_per_task`` items of every task, a draw seeded by ``seed`` (and the split)."""
    items: list[Item] = []
    for name in lc.tasks:
        if name == "needle":
            items += needle_items(lc.items_per_task, lc.needle_keys,
                                  seed + (DEV_NEEDLE_SEED if lc.split == "dev" else 0))
            continue
        path = babi_file(root, lc, name)
        stories = load_babi(path, name)
        if lc.items_per_task > len(stories):
            raise DataError(f"{path}: {len(stories)} stories, fewer than long_context.items_per_task "
                            f"({lc.items_per_task})")
        items += random.Random(f"{seed}:{name}").sample(stories, lc.items_per_task)
    return items


@task(cache_policy=NO_CACHE)
def prepare_documents(params: Params, root: Path, comp: Comparison) -> dict[int, list[Document]]:
    """Every seed's documents: each item at each length, built with the base model's tokenizer.

    A story with no question, a length shorter than a story, an empty distractor source: a DataError
    naming the file, before anything trains."""
    lc = comp.long_context
    if lc is None:
        raise ValueError(f"comparison {comp.name!r} is not a long-context comparison")
    where = f"evaluation.comparisons.{comp.name}.long_context"
    source = _root_path(root, lc.distractors)
    distractors = load_distractors(source)
    tokenizer = load_base_model(params.model, root=root).tokenizer
    out = {}
    for seed in comp.seeds:
        items = draw_items(root, lc, seed)
        docs = []
        for item in items:
            for length in lc.lengths:
                try:
                    docs.append(build_document(tokenizer, item, distractors, length, seed, where=f"{where}.lengths"))
                except DataError as e:
                    source = babi_file(root, lc, item.task) if item.task != "needle" else "long_context.needle_keys"
                    raise DataError(f"{source}: {e}") from None
        out[seed] = docs
    get_run_logger().info(f"{comp.name}: {len(out[comp.seeds[0]])} documents per seed ({len(lc.tasks)} tasks x "
                          f"{lc.items_per_task} items x lengths {lc.lengths}), distractors from {source.name}")
    return out


def documents_digest(docs: list[Document]) -> str:
    """What a run's documents are (their text, question and candidates): part of its key."""
    h = hashlib.sha256()
    for d in docs:
        h.update(json.dumps([d.item.item_id, d.length, d.text, d.item.question, d.item.answer,
                             list(d.item.candidates)]).encode())
    return h.hexdigest()


def doc_id(doc: Document) -> str:
    return f"{doc.item.item_id}@{doc.length}"


def facts_in_window(doc: Document, window: int) -> bool:
    """Whether every fact starts inside the document's last ``window`` tokens (what in_context sees, about)."""
    return bool(doc.fact_tokens) and min(doc.fact_tokens) >= doc.n_tokens - window


def partial_result(rdir: Path, method: str, seed: int) -> dict[str, Any] | None:
    """An unfinished run's documents so far (its progress lines of the latest key), marked ``partial``; None
    without any. What ``compare --report-only`` shows of a run that has no result.json yet."""
    path = rdir / PROGRESS_FILE
    if not path.is_file():
        return None
    lines = []
    for text in path.read_text(encoding="utf-8").splitlines():
        try:
            lines.append(json.loads(text))
        except json.JSONDecodeError:
            continue  # a line a crash cut short
    if not lines:
        return None
    rows = [{k: v for k, v in r.items() if k != "key"} for r in lines if r.get("key") == lines[-1].get("key")]
    return {"method": method, "seed": seed, "kind": "long_context", "partial": True, "documents": rows,
            "gradient_steps": sum(int(r["gradient_steps"]) for r in rows),
            "seconds": round(sum(float(r["seconds"]) for r in rows), 1)}


class _Runner:
    """A method's model, loaded once, and how it reads and answers one document from the fresh state."""

    def __init__(self, p: Params, root: Path, method: str, lc: LongContextConfig, baselines: BaselinesConfig) -> None:
        self.p, self.method, self.lc, self.baselines = p, method, lc, baselines
        self.max_length = lc.window + 16  # a piece, its EOS and the reading prompt
        self.judge = None
        self.cms = None
        n_slow = slow_levels(method)
        if method in ("cms",) or n_slow:
            run_p = p if not n_slow else p.model_copy(update={"cms": sleep_levels(p.cms, n_slow, lc.sleep_every)})
            self.loaded, self.cms, _ = open_memory_model(run_p, root)
            self.snapshot = MemorySnapshot(self.cms)
            if n_slow and p.consolidation.alpha < 1 and p.consolidation.gamma > 0:
                self.judge = SemanticJudge.load(p.consolidation.semantic_threshold)
        else:
            self.loaded = load_base_model(p.model, root=root)
            self.loaded.model.to(resolve_device(p.model.device))
            if method == "finetune":
                b = baselines
                self.lora = attach_lora(self.loaded.model, b.lora_r, b.lora_alpha, b.lora_targets, seed=p.seed)
                self.fresh = [x.detach().clone() for x in self.lora]
            if method == "retrieval":
                self.judge = SemanticJudge.load(p.consolidation.semantic_threshold)
        self.loaded.model.eval()

    def run(self, doc: Document, seed: int) -> tuple[int, Reading]:
        model, tok, lc = self.loaded.model, self.loaded.tokenizer, self.lc
        if self.method == "facts_only":
            return answer_facts_only(model, tok, doc, lc.window, lc.scoring), Reading()
        if self.method == "in_context":
            return answer_in_context(model, tok, doc, lc.window, lc.scoring), Reading()
        if self.method == "retrieval":
            return answer_retrieval(model, tok, doc, lc.window, self.judge.cosine, lc.scoring)[0], Reading()
        pieces = document_pieces(tok, doc, lc.window)
        if self.method == "finetune":
            with torch.no_grad():
                for x, v in zip(self.lora, self.fresh):
                    x.copy_(v)
            reading = read_lora(model, tok, self.lora, pieces, self.baselines.lr, lc.epochs,
                                self.max_length, self.p.wake.grad_clip, seed)
        else:
            self.snapshot.restore(self.cms)
            sleeps = self.p.consolidation if slow_levels(self.method) else None
            reading = read_cms(model, tok, self.cms, pieces, self.max_length, lc.epochs, lc.sleep_every, sleeps, seed,
                               lc.prompt_tokens, self.judge, self.p.sampling, self.p.wake.grad_clip)
        model.eval()
        return answer_from_memory(model, tok, doc, self.max_length, lc.scoring), reading


@task(cache_policy=NO_CACHE)
def run_long_context_method(p: Params, root: Path, rdir: Path, method: str, lc: LongContextConfig,
                            docs: list[Document], baselines: BaselinesConfig) -> dict[str, Any]:
    """One method on one seed over its documents; writes result.json. Resumes at the first unfinished document.

    ``baselines``: the LoRA settings of ``finetune`` (rank, targets, learning rate), part of the run's key."""
    log = get_run_logger()
    if method not in METHODS:
        raise ValueError(f"{method} is not a long-context method; one of {', '.join(METHODS)}")
    key = run_key(p, method, baselines=baselines, extra={"long_context": lc.model_dump(mode="json"), "documents": documents_digest(docs)},
                  data=_root_path(root, lc.distractors))
    hit = cached_result(rdir, key)
    if hit is not None:
        log.info(f"{method} seed {p.seed}: result on disk, not run again")
        return hit
    rdir.mkdir(parents=True, exist_ok=True)
    progress_file = rdir / PROGRESS_FILE
    progress = read_keyed_lines(progress_file, key)
    write_lines(progress_file, progress)  # drops a line a crash cut short
    done = {r["doc"] for r in progress}
    if done:
        log.info(f"{method} seed {p.seed}: {len(done)}/{len(docs)} documents on disk, resuming")
    configure_torch(p.wake.threads, p.wake.deterministic)
    runner = _Runner(p, root, method, lc, baselines)
    todo = [d for d in docs if doc_id(d) not in done]
    bar = tqdm(total=sum(d.n_tokens for d in todo), desc=f"{method} seed {p.seed}", unit="tok", unit_scale=True)
    for k, doc in enumerate(todo):
        start = time.perf_counter()
        chosen, reading = runner.run(doc, p.seed * 7_919 + k)
        item = doc.item
        row = {"doc": doc_id(doc), "task": item.task, "item_id": item.item_id, "length": doc.length,
               "n_tokens": doc.n_tokens, "correct": item.candidates[chosen] == item.answer,
               "chosen": item.candidates[chosen], "answer": item.answer, "n_candidates": len(item.candidates),
               "facts_in_window": facts_in_window(doc, lc.window), "gradient_steps": reading.gradient_steps,
               "sleeps": len(reading.sleeps), "seconds": round(time.perf_counter() - start, 2)}
        append_line(progress_file, {"key": key, **row})
        progress.append({"key": key, **row})
        bar.update(doc.n_tokens)
        log.info(f"{method} seed {p.seed} [{len(progress)}/{len(docs)}] {row['doc']}: "
                 f"{'right' if row['correct'] else 'wrong'} ({row['chosen']} / {row['answer']}), "
                 f"{reading.gradient_steps} steps, {len(reading.sleeps)} consolidations ({row['seconds']:.0f} s)")
    bar.close()
    by_doc = {r["doc"]: {k: v for k, v in r.items() if k != "key"} for r in progress}
    rows = [by_doc[doc_id(d)] for d in docs]
    result = {"method": method, "seed": p.seed, "key": key, "kind": "long_context", "documents": rows,
              "gradient_steps": sum(int(r["gradient_steps"]) for r in rows),
              "seconds": round(sum(float(r["seconds"]) for r in rows), 1)}
    write_json(rdir / RESULT_FILE, result)
    return result


__all__ = ["PROGRESS_FILE", "babi_file", "doc_id", "documents_digest", "draw_items", "facts_in_window", "partial_result",
           "prepare_documents", "run_long_context_method"]
