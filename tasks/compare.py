"""Prefect tasks of a comparison (``lm-sleep compare NAME``, docs/design.md §5).

A comparison runs methods x seeds on the same data, model and budget. Each run has
its own directory ``<evaluation.work_dir>/<name>/<method>/seed-<s>/`` holding the
params it ran with (``params.yaml``: the project's params, the comparison's
overrides, the seed, the method's own switches) and its ``result.json``. Each seed
draws its own tasks (``data.seed``), prepared once per seed under ``data/seed-<s>/``
and shared by every method. A run whose result is on disk with the same key (its
params, the code, its stream) is not run again, so an interrupted comparison resumes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd
import yaml
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from model.config import (
    METHOD_OVERRIDES,
    BaselinesConfig,
    ConfigError,
    KnowledgeConfig,
    LongContextConfig,
    Params,
    cms_lr_overrides,
    merge_overrides,
    quick_section,
)
from model.data.stream import STREAM_FILE, DataError, build_stream, load_source, load_stream, task_file
from model.decoding.loading import load_base_model, resolve_device
from model.evaluation.comparison import BASELINES, check_stream, evaluation_labels, run_baseline
from model.io import sha256_file, write_json, write_text
from model.runtime import configure_torch
from tasks.caching import code_digest
from tasks.machine import machine
from tasks.prepare import check_and_report_stream, write_stream_files

RESULT_FILE = "result.json"


@dataclass(frozen=True)
class Comparison:
    """A comparison as it will run: its methods, seeds and the overrides of every run."""

    name: str
    methods: tuple[str, ...]
    seeds: tuple[int, ...]
    overrides: dict
    quick: bool
    description: str = ""
    kind: str = "continual"
    knowledge: KnowledgeConfig | None = None  # kind knowledge: the passages (evaluation.quick's merged in)
    long_context: LongContextConfig | None = None  # kind long_context: the documents (evaluation.quick's merged in)


def is_baseline(method: str) -> bool:
    """Whether ``method`` is one of the baselines (trained by ``model.evaluation.comparison.run_baseline``, not a lifecycle)."""
    return method in BASELINES


def resolve_comparison(params: Params, name: str, quick: bool = False, methods: list[str] | None = None) -> Comparison:
    """The comparison ``name`` of params (with ``evaluation.quick`` applied when ``quick``)."""
    known = params.evaluation.comparisons
    if name not in known:
        raise ConfigError(f"params: evaluation.comparisons has no comparison {name!r}; "
                          f"defined: {', '.join(sorted(known)) or 'none'}")
    comp = known[name]
    seeds, overrides = list(comp.seeds), dict(comp.overrides)
    knowledge, long_context = comp.knowledge, comp.long_context
    if quick:
        extra = dict(params.evaluation.quick)
        seeds = list(extra.pop("seeds", seeds))
        if knowledge is not None:
            knowledge = quick_section(knowledge, extra, "knowledge", f"evaluation.quick.knowledge ({name})")
        if long_context is not None:
            long_context = quick_section(long_context, extra, "long_context",
                                         f"evaluation.quick.long_context ({name})")
        extra.pop("knowledge", None)
        extra.pop("long_context", None)
        overrides = merge_overrides(overrides, extra)
    chosen = list(comp.methods)
    if methods:
        unknown = [m for m in methods if m not in comp.methods]
        if unknown:
            raise ConfigError(f"comparison {name!r} has no method(s) {unknown}; its methods: {list(comp.methods)}")
        chosen = [m for m in comp.methods if m in methods]
    return Comparison(name, tuple(chosen), tuple(seeds), overrides, quick, comp.description, comp.kind, knowledge,
                      long_context)


def development_overrides(params: Params, root: Path, comp: Comparison) -> tuple[dict, int]:
    """``comp``'s overrides with every label of the evaluation streams excluded from the source (the labels that
    any seed of any continual comparison puts in its stream), and how many labels that excludes."""
    base = params.for_run(comp.overrides, f"evaluation.comparisons.{comp.name}.overrides")
    excluded = sorted(evaluation_labels(params, root))
    exclude = list(dict.fromkeys([*base.data.source.exclude_labels, *excluded]))
    return merge_overrides(comp.overrides, {"data": {"source": {"exclude_labels": exclude}}}), len(excluded)


def development_comparison(params: Params, root: Path, comp: Comparison) -> Comparison:
    """``comp`` on development tasks, named ``<name>-dev``: the same methods, budget and sizes, on streams
    drawn from labels that no evaluation stream uses, so a choice made on it never saw an evaluation task."""
    if comp.kind != "continual":
        raise ConfigError(f"comparison {comp.name!r} is a {comp.kind} comparison; --dev needs a continual one")
    overrides, n = development_overrides(params, root, comp)
    return replace(comp, name=f"{comp.name}-dev", overrides=overrides,
                   description=f"{comp.description} On development tasks ({n} evaluation labels excluded).".strip())


def comparison_dir(params: Params, root: Path, comp: Comparison) -> Path:
    return root / params.evaluation.work_dir / (comp.name + ("-quick" if comp.quick else ""))


def run_dir(params: Params, root: Path, comp: Comparison, method: str, seed: int) -> Path:
    return comparison_dir(params, root, comp) / method / f"seed-{seed}"


def data_dir(params: Params, root: Path, comp: Comparison, seed: int) -> Path:
    return comparison_dir(params, root, comp) / "data" / f"seed-{seed}"


def _absolute(root: Path, path: str | None) -> str | None:
    if path is None:
        return None
    p = Path(path)
    return str(p if p.is_absolute() else (root / p).resolve())


def seed_params(params: Params, root: Path, comp: Comparison, seed: int) -> Params:
    """The params every run of ``seed`` shares: project params + comparison overrides + the seed.

    Input paths become absolute (a run lives in its own directory); the stream is the
    seed's shared one (each seed draws its own tasks); nothing is published to the
    artifact store.
    """
    base = params.for_run(comp.overrides, f"evaluation.comparisons.{comp.name}.overrides")
    seeded = {
        "seed": seed,
        "data": {"seed": seed, "out_dir": str(data_dir(params, root, comp, seed) / "processed"),
                 "source": {"path": _absolute(root, base.data.source.path)}},
        "dream": {"passages": _absolute(root, base.dream.passages)},
        "lifecycle": {"publish": False},
    }
    if base.model.path is not None:
        seeded["model"] = {"path": _absolute(root, base.model.path)}
    return base.for_run(seeded, f"evaluation.comparisons.{comp.name} (seed {seed})")


def run_params(params: Params, root: Path, comp: Comparison, method: str, seed: int) -> Params:
    """The params of one run: :func:`seed_params` plus the method's own switches (METHOD_OVERRIDES) and, for a
    CMS method with its own learning rate in ``evaluation.lrs``, its levels' learning rates."""
    where = f"evaluation.comparisons.{comp.name} ({method}, seed {seed})"
    p = seed_params(params, root, comp, seed).for_run(METHOD_OVERRIDES.get(method, {}), where)
    lr = params.evaluation.lrs.get(method)
    if lr is not None and method not in BASELINES:
        p = p.for_run(cms_lr_overrides(p.cms, lr), f"{where}, evaluation.lrs")
    return p


def method_baselines(params: Params, method: str) -> BaselinesConfig:
    """The baseline settings of ``method``: ``evaluation.baselines`` with the method's own learning rate from
    ``evaluation.lrs`` where it has one."""
    lr = params.evaluation.lrs.get(method)
    base = params.evaluation.baselines
    return base if lr is None else base.model_copy(update={"lr": lr})


def write_run_params(p: Params, path: Path) -> Path:
    """Write a run's params.yaml (what `lm-sleep` flows read), atomically."""
    raw = p.model_dump(mode="json", exclude={"evaluation"})
    return write_text(path, "# written by lm-sleep compare: the params this run used\n"
                      + yaml.safe_dump(raw, sort_keys=False))


@task(cache_policy=NO_CACHE)
def prepare_streams(params: Params, root: Path, comp: Comparison) -> dict[int, tuple[pd.DataFrame, dict[int, list[str]]]]:
    """Build, check and write the stream of every seed, before any run trains.

    Bad input (unknown fields, too few examples for a label, more tasks than labels,
    an empty task) raises here, naming the file and field. A stream already on disk
    that equals the rebuilt one is left untouched (its digest keys the runs' caches).
    """
    log = get_run_logger()
    out = {}
    for seed in comp.seeds:
        p = seed_params(params, root, comp, seed)
        source = load_source(p.data.source, root)
        stream, plan = build_stream(source, p.data)
        where = f"{p.data.source.path} (seed {seed})"
        check_stream(stream, plan, where)
        check_and_report_stream(stream, plan, data_dir(params, root, comp, seed) / "validation")
        target = Path(p.data.out_dir)
        try:
            old_stream, old_plan = load_stream(target)
            same = old_stream.equals(stream) and old_plan == plan and all(task_file(target, t).is_file() for t in plan)
        except (DataError, OSError, ValueError):  # missing or unreadable: write it
            same = False
        if not same:
            write_stream_files(stream, plan, target)
        log.info(f"{comp.name}: seed {seed}: {len(plan)} tasks {[len(v) for v in plan.values()]} labels, "
                 f"{int((stream['split'] == 'train').sum())} train / {int((stream['split'] == 'test').sum())} test rows")
        out[seed] = (stream, plan)
    return out


#: Where a comparison's runs go (evaluation.workers, runner, runner_kwargs): not what their results depend on.
SCALE_OUT = {"evaluation": {"workers", "runner", "runner_kwargs"}}


def run_key(p: Params, method: str, baselines: BaselinesConfig | None = None, data: Path | None = None,
            extra: dict | None = None) -> str:
    """Digest of what a run's result depends on: its params (and baseline settings, ``extra``), the code,
    its data (``data``; default: its stream)."""
    h = hashlib.sha256()
    h.update(method.encode())
    h.update(json.dumps(p.model_dump(mode="json", exclude=SCALE_OUT), sort_keys=True).encode())
    if baselines is not None:
        h.update(json.dumps(baselines.model_dump(mode="json"), sort_keys=True).encode())
    if extra is not None:
        h.update(json.dumps(extra, sort_keys=True).encode())
    h.update(code_digest().encode())
    h.update(sha256_file(data if data is not None else Path(p.data.out_dir) / STREAM_FILE).encode())
    return h.hexdigest()


def cached_result(rdir: Path, key: str) -> dict | None:
    """The run's result.json if it was computed with ``key``."""
    path = rdir / RESULT_FILE
    if not path.is_file():
        return None
    try:
        res = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None
    return res if res.get("key") == key else None


#: What a baseline's result depends on: the params sections it reads and the modules whose code it runs.
BASELINE_SECTIONS = ("seed", "model", "data", "wake")
BASELINE_CODE = ("model/evaluation/baselines.py", "model/evaluation/comparison.py", "model/evaluation/ewc.py",
                 "model/evaluation/prototype_classifier.py", "model/memory/prototypes.py",
                 "model/memory/wake.py", "model/decoding/forward.py", "model/decoding/loading.py", "model/data/stream.py")


def baseline_key(p: Params, method: str, baselines: BaselinesConfig) -> str:
    """Digest of what a baseline's result depends on: only the params sections it reads, its baseline
    settings, the code it runs and its stream. Changes to sleep (its params or its modules) leave a
    finished baseline run valid, so a long comparison resumes without recomputing the baselines."""
    h = hashlib.sha256()
    h.update(method.encode())
    dump = p.model_dump(mode="json")
    h.update(json.dumps({k: dump[k] for k in BASELINE_SECTIONS}, sort_keys=True).encode())
    h.update(json.dumps(baselines.model_dump(mode="json"), sort_keys=True).encode())
    root = Path(__file__).resolve().parents[1]
    for rel in BASELINE_CODE:
        h.update(rel.encode())
        h.update((root / rel).read_bytes())
    h.update(sha256_file(Path(p.data.out_dir) / STREAM_FILE).encode())
    return h.hexdigest()


@task(cache_policy=NO_CACHE)
def run_baseline_method(
    p: Params, baselines: BaselinesConfig, rdir: Path, method: str, stream: pd.DataFrame, plan: dict[int, list[str]]
) -> dict:
    """One baseline (model.evaluation.comparison.BASELINES) over the seed's stream; writes result.json."""
    log = get_run_logger()
    key = baseline_key(p, method, baselines)
    hit = cached_result(rdir, key)
    if hit is not None:
        log.info(f"{method} seed {p.seed}: result on disk, not run again")
        return hit
    if method not in BASELINES:
        raise ValueError(f"{method} is not a baseline")
    configure_torch(p.wake.threads, p.wake.deterministic)
    loaded = load_base_model(p.model)
    loaded.model.to(resolve_device(p.model.device))

    def on_period(period: int, acc: dict[str, float]) -> None:
        log.info(f"{method} seed {p.seed}: after task {period}: " + " ".join(f"{a:.2f}" for a in acc.values()))

    run = run_baseline(method, loaded.model, loaded.tokenizer, stream, plan, p.wake, baselines, p.seed, on_period)
    result = {"method": method, "seed": p.seed, "key": key, "accuracy": run.accuracy,
              "gradient_steps": run.gradient_steps, "seconds": round(run.seconds, 1),
              "losses": [[round(x, 5) for x in period] for period in run.losses],
              "machine": machine(resolve_device(p.model.device), p.wake.threads)}
    write_json(rdir / RESULT_FILE, result)
    return result


def finished_results(params: Params, root: Path, comp: Comparison) -> tuple[list[dict], list[tuple[str, int]]]:
    """Every run of ``comp`` whose result.json is on disk (whatever code or params it ran with), and the
    (method, seed) pairs that have none: what a report over the finished runs shows and leaves out."""
    done, missing = [], []
    for seed in comp.seeds:
        for method in comp.methods:
            path = run_dir(params, root, comp, method, seed) / RESULT_FILE
            try:
                done.append(json.loads(path.read_text(encoding="utf-8")))
            except (OSError, json.JSONDecodeError):
                missing.append((method, seed))
    return done, missing


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


@task(cache_policy=NO_CACHE)
def collect_cms_result(p: Params, rdir: Path, method: str, rows: list[dict], seconds: float) -> dict:
    """A CMS-family run's result.json from its evaluate rows and its stage metrics.

    Gradient steps count the updates of the model's own (memory) parameters: wake steps,
    consolidation steps, ReST-EM generator steps and promotion steps. Dream trials train
    throw-away adapters and are not counted.
    """
    steps = {"wake": 0, "consolidation": 0, "dream": 0}
    for period in range(len(rows)):
        steps["wake"] += int(_json(rdir / p.wake.metrics_dir / f"period-{period}.json").get("steps", 0))
        cons = _json(rdir / p.consolidation.metrics_dir / f"period-{period}.json")
        steps["consolidation"] += sum(len(c.get("loss", [])) for c in cons.get("consolidations", []))
        dream = _json(rdir / p.dream.metrics_dir / f"period-{period}.json")
        steps["dream"] += len(dream.get("promotion_losses") or [])
        table = rdir / p.dream.dreams_dir / f"period-{period}-dreams.parquet"
        if table.is_file() and p.dream.rest_steps:
            d = pd.read_parquet(table, columns=["context_id", "round", "reward"])
            steps["dream"] += p.dream.rest_steps * int(d[d["reward"] == 1.0].groupby(["context_id", "round"]).ngroups)
    result = {"method": method, "seed": p.seed, "key": run_key(p, method),
              "accuracy": [r["accuracy"] for r in rows], "gradient_steps": sum(steps.values()),
              "gradient_steps_by_stage": steps, "seconds": round(seconds, 1),
              "dream_funnels": [r.get("dream_funnel") for r in rows],
              "diagnostics": [r.get("diagnostics") for r in rows],
              "routing_accuracy": [r.get("routing_accuracy") for r in rows],
              "machine": machine(resolve_device(p.model.device), p.wake.threads)}
    write_json(rdir / RESULT_FILE, result)
    return result
