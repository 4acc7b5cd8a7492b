"""The compare flow: a named comparison of sleep with baselines and ablations (docs/design.md §5).

``lm-sleep compare NAME`` (or ``python -m flows.compare NAME``) runs every method of
``evaluation.comparisons.NAME`` on every seed, on the same data, model and budget, and
writes ``reports/NAME/``: a markdown table (mean and 95% CI over seeds), plots and DVC
metrics. Every seed's stream is built and checked before anything trains. The CMS
methods (cms, sleep and its ablations) run the lifecycle's own wake, sleep and evaluate
flows in a directory of their own, with the method's switches in its params.yaml; the
baselines run ``model/evaluation/comparison.py``. Finished runs are kept, so a rerun after a crash
resumes; ``--quick`` applies ``evaluation.quick`` (a smoke run, for tests).

A comparison of ``kind: knowledge`` instead learns SQuAD passages (single passage or
continued pretraining) with base / passage_finetune / base_dreams / sleep and answers
their questions without context (``tasks/knowledge.py``, ``model/evaluation/incorporation.py``);
its passages are checked before anything trains, and a run resumes mid-way.
"""

from __future__ import annotations

import re
import sys
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.args import command_parser
from flows.errors import reporting_errors
from flows.evaluate import evaluate
from flows.server import command_server
from flows.sleep import sleep
from flows.wake import wake
from model.config import BaselinesConfig, ConfigError, EvaluationConfig, Params, load_params
from tasks.compare import (
    Comparison,
    cached_result,
    collect_cms_result,
    finished_results,
    is_baseline,
    method_baselines,
    comparison_dir,
    development_comparison,
    prepare_streams,
    resolve_comparison,
    run_baseline_method,
    run_dir,
    run_key,
    run_params,
    write_run_params,
)
from tasks.guards import locked
from tasks.knowledge import policy_dir, prepare_passages, run_knowledge_method, train_dream_policy, trains_a_policy
from tasks.long_context import partial_result, prepare_documents, run_long_context_method
from tasks.report import write_comparison_report, write_knowledge_report, write_long_context_report
from tasks.runners import runner_for_workers


@flow(name="compare", log_prints=True)
def compare(name: str, params_path: str = "params.yaml", quick: bool = False, methods: list[str] | None = None,
            report_only: bool = False, dev: bool = False, seeds: list[int] | None = None,
            shard: tuple[int, int] | None = None, device: str | None = None, workers: int | None = None) -> dict:
    """Run comparison ``name``: every method on every seed; then its report. Returns the report's summary.

    ``report_only``: run nothing; write the report over the runs that have finished (the rest are listed).
    ``dev``: the comparison on development tasks (``<name>-dev``, no evaluation label in its streams), where
    choices are made. ``seeds``: only these seeds. ``shard`` = (i, n): a knowledge comparison (single mode)
    runs only every n-th passage from the i-th, beside the other shards, and writes no report; a run without
    ``shard`` afterwards reuses every passage the shards finished. ``device``: model.device for every run.
    ``workers``: evaluation.workers (a continual comparison's runs at once on evaluation.runner)."""
    log = get_run_logger()
    params = with_run_options(load_params(params_path), device, workers)
    root = Path(params_path).resolve().parent
    comp = resolve_comparison(params, name, quick, methods)
    if seeds:
        comp = replace(comp, seeds=tuple(dict.fromkeys(seeds)))
    if dev:
        comp = development_comparison(params, root, comp)
    if report_only:
        results, missing = finished_results(params, root, comp)
        if comp.kind == "long_context":  # an unfinished run counts with the documents it has read
            partial = {(m, s): partial_result(run_dir(params, root, comp, m, s), m, s) for m, s in missing}
            results += [r for r in partial.values() if r is not None]
            missing = [k for k, r in partial.items() if r is None]
        if not results:
            raise ConfigError(f"comparison {name!r}: no finished run under {comparison_dir(params, root, comp)}")
        if missing:
            log.warning(f"{name}: report over the finished runs; not run yet: "
                        + ", ".join(f"{m} (seed {s})" for m, s in missing))
        seeds = tuple(s for s in comp.seeds if any(r["seed"] == s for r in results))
        write = {"knowledge": write_knowledge_report, "long_context": write_long_context_report}.get(
            comp.kind, write_comparison_report)
        summary = write(params, root, replace(comp, seeds=seeds), results)
        log.info(f"report: {summary['report']}")
        return summary
    if comp.kind == "knowledge":
        return compare_knowledge(params, root, comp, shard)
    if comp.kind == "long_context" and shard is None:
        return compare_long_context(params, root, comp)
    if shard is not None:
        raise ConfigError(f"comparison {name!r}: --shard splits the passages of a knowledge comparison; this one is "
                          f"kind '{comp.kind}'")
    with locked(comparison_dir(params, root, comp), "comparison run"):
        results = run_continual(params, root, comp)
        summary = write_comparison_report(params, root, comp, results)
    log.info(f"report: {summary['report']}")
    return summary


def with_run_options(params: Params, device: str | None = None, workers: int | None = None) -> Params:
    """``params`` with the command line's ``--device`` (model.device of every run) and ``--workers``
    (evaluation.workers: where the runs go, not what they compute, so no run's key changes); the comparisons stay."""
    if device is not None:
        params = params.for_run({"model": {"device": device}}, "--device").model_copy(
            update={"evaluation": params.evaluation})
    if workers is not None:
        params = params.model_copy(update={"evaluation": params.evaluation.model_copy(update={"workers": workers})})
    return params


def each_run(params: Params, root: Path, comp: Comparison):
    """(i, n, seed, method, the run's params, its directory) for every method on every seed, seeds outermost."""
    runs = [(seed, m) for seed in comp.seeds for m in comp.methods]
    for i, (seed, method) in enumerate(runs, 1):
        p = run_params(params, root, comp, method, seed)
        yield i, len(runs), seed, method, p, run_dir(params, root, comp, method, seed)


def one_run(p: Params, method: str, rdir: Path, stream: pd.DataFrame, plan: dict[int, list[str]],
            baselines: BaselinesConfig) -> dict:
    """One method on one seed; a finished run is read back. A baseline is one task; a CMS method runs the
    lifecycle's flows period by period (wake, sleep, evaluate) on the run's own params file."""
    if is_baseline(method):
        return run_baseline_method(p, baselines, rdir, method, stream, plan)
    res = cached_result(rdir, run_key(p, method))
    if res is not None:
        return res
    params_file = str(write_run_params(p, rdir / "params.yaml"))
    start = time.perf_counter()
    rows = []
    for period in sorted(plan):
        wake(period, params_file)
        sleep(period, params_file)
        rows.append(evaluate(period, params_file, summary=False))
    return collect_cms_result(p, rdir, method, rows, time.perf_counter() - start)


@task(name="comparison-run", cache_policy=NO_CACHE)
def comparison_run(p: Params, method: str, rdir: Path, stream: pd.DataFrame, plan: dict[int, list[str]],
                   baselines: BaselinesConfig) -> dict:
    """:func:`one_run` as a task, so that a task runner takes it elsewhere (``evaluation.workers`` > 1)."""
    return one_run(p, method, rdir, stream, plan, baselines)


def run_continual(params: Params, root: Path, comp: Comparison, baselines: BaselinesConfig | None = None) -> list[dict]:
    """Every method of a continual comparison on every seed (finished runs are read back); their results, in order.

    With ``evaluation.workers`` = 1 the runs go one after the other in this process; with N > 1 each is a
    task on ``evaluation.runner`` (a local Dask cluster of N processes by default), and the results are the
    same. ``baselines``: the settings of every baseline run (default: ``evaluation.baselines`` with each
    method's own learning rate from ``evaluation.lrs``). The caller holds the comparison directory's lock."""
    log = get_run_logger()
    streams = prepare_streams(params, root, comp)  # bad data fails here, before any training
    runs = [(i, n, seed, method, p, rdir, *streams[seed],
             baselines if baselines is not None else method_baselines(params, method))
            for i, n, seed, method, p, rdir in each_run(params, root, comp)]

    def finished(i: int, n: int, seed: int, method: str, res: dict) -> dict:
        final = res["accuracy"][-1]
        log.info(f"[{i}/{n}] {method}, seed {seed}: final accuracy "
                 + " ".join(f"{a:.2f}" for a in final.values()) + f" ({res['seconds']:.0f} s)")
        return res

    ev = params.evaluation
    if ev.workers == 1 or len(runs) == 1:
        results = []
        for i, n, seed, method, p, rdir, stream, plan, settings in runs:
            log.info(f"[{i}/{n}] {method}, seed {seed} ({rdir.relative_to(root)})")
            results.append(finished(i, n, seed, method, one_run(p, method, rdir, stream, plan, settings)))
        return results
    with runner_for_workers(ev.runner, ev.runner_kwargs, ev.workers, "evaluation.runner") as runner:
        log.info(f"{comp.name}: {len(runs)} runs, up to {ev.workers} at once on {ev.runner}")
        futures = []
        for i, n, seed, method, p, rdir, stream, plan, settings in runs:
            log.info(f"[{i}/{n}] {method}, seed {seed} ({rdir.relative_to(root)}): submitted")
            futures.append(((i, n, seed, method), runner.submit(comparison_run, {
                "p": p, "method": method, "rdir": rdir, "stream": stream, "plan": plan, "baselines": settings})))
        return [finished(*run, future.result()) for run, future in futures]


def compare_knowledge(params: Params, root: Path, comp: Comparison, shard: tuple[int, int] | None = None) -> dict:
    """A knowledge-incorporation comparison: every method on every seed over the passages; then its report.

    With ``shard`` = (i, n), the i-th of n processes: its share of the passages, no report (see :func:`compare`)."""
    log = get_run_logger()
    results = []
    cdir = comparison_dir(params, root, comp)
    if shard is not None and comp.knowledge.mode != "single":
        raise ConfigError(f"comparison {comp.name!r}: --shard needs mode single (in continued mode one state learns "
                          "the passages in turn)")
    lock = cdir if shard is None else cdir / "shards" / f"{shard[0]}-of-{shard[1]}"
    with locked(lock, "comparison run"):
        passages = prepare_passages(root, comp)  # a missing file or too few passages fails here, before training
        runs = []
        for i, n, seed, method, p, rdir in each_run(params, root, comp):
            digest = None
            if trains_a_policy(method):  # ReST-EM over the training pool first (once per seed, resumable)
                trained = train_dream_policy(p, root, policy_dir(comparison_dir(params, root, comp), seed),
                                             comp.knowledge, passages)
                p = p.for_run({"dream": {"policy": {"source": trained["policy"]}}}, f"{comp.name} ({method}, seed {seed})")
                digest = trained["policy_sha256"]
            write_run_params(p, rdir / "params.yaml")
            runs.append((i, n, seed, method, p, rdir, digest))
        ev = params.evaluation
        if shard is None and ev.workers > 1 and comp.knowledge.mode == "single":
            spread_passages(ev, comp, root, passages,
                            [(p, rdir, method, digest) for *_, method, p, rdir, digest in runs])
        for i, n, seed, method, p, rdir, digest in runs:  # with spread passages: each run assembles its shards
            log.info(f"[{i}/{n}] {method}, seed {seed} ({rdir.relative_to(root)})")
            res = run_knowledge_method(p, root, rdir, method, comp.knowledge, passages, digest, shard)
            tau = sum(r["tau"] for r in res["passages"]) / max(1, len(res["passages"]))
            log.info(f"[{i}/{n}] {method}, seed {seed}: mean tau {tau:.3f} over {len(res['passages'])} passages "
                     f"({res['seconds']:.0f} s)")
            results.append(res)
        if shard is not None:
            log.info(f"shard {shard[0]}/{shard[1]} done; `lm-sleep compare {comp.name}` without --shard assembles the runs")
            return {"report": None, "shard": list(shard), "runs": results}
        summary = write_knowledge_report(params, root, comp, results)
    log.info(f"report: {summary['report']}")
    return summary


def spread_passages(ev: EvaluationConfig, comp: Comparison, root: Path, passages: list,
                    runs: list[tuple[Params, Path, str, str | None]]) -> None:
    """Every run's passages as ``ev.workers`` shards, each a task on ``ev.runner`` (single mode: the passages are
    independent); the run itself then finds them all done and only assembles its result."""
    log = get_run_logger()
    with runner_for_workers(ev.runner, ev.runner_kwargs, ev.workers, "evaluation.runner") as runner:
        log.info(f"{comp.name}: {len(runs)} runs x {ev.workers} shards of the passages on {ev.runner}")
        futures = [runner.submit(run_knowledge_method, {
            "p": p, "root": root, "rdir": rdir, "method": method, "kc": comp.knowledge, "passages": passages,
            "policy_sha256": digest, "shard": (k, ev.workers)}) for p, rdir, method, digest in runs
            for k in range(ev.workers)]
        for future in futures:
            future.result()


def compare_long_context(params: Params, root: Path, comp: Comparison) -> dict:
    """A long-context comparison: the documents, every method on every seed over them; then its report."""
    log = get_run_logger()
    with locked(comparison_dir(params, root, comp), "comparison run"):
        documents = prepare_documents(params, root, comp)  # bad data fails here, before any training
        results = []
        for i, n, seed, method, p, rdir in each_run(params, root, comp):
            log.info(f"[{i}/{n}] {method}, seed {seed} ({rdir.relative_to(root)})")
            write_run_params(p, rdir / "params.yaml")
            res = run_long_context_method(p, root, rdir, method, comp.long_context, documents[seed],
                                          method_baselines(params, method))
            acc = sum(r["correct"] for r in res["documents"]) / max(1, len(res["documents"]))
            log.info(f"[{i}/{n}] {method}, seed {seed}: accuracy {acc:.2f} over {len(res['documents'])} "
                     f"documents ({res['seconds']:.0f} s)")
            results.append(res)
        summary = write_long_context_report(params, root, comp, results)
    log.info(f"report: {summary['report']}")
    return summary


@reporting_errors("lm-sleep compare")
def main(argv: list[str] | None = None) -> int:
    ap = command_parser("lm-sleep compare", "Run a named comparison of params.yaml (evaluation.comparisons) and "
                        "write reports/<name>/.")
    ap.add_argument("name", help="the comparison, e.g. default or ablations")
    ap.add_argument("--quick", action="store_true", help="apply evaluation.quick: a small smoke run")
    ap.add_argument("--methods", nargs="+", help="only these methods of the comparison")
    ap.add_argument("--report-only", action="store_true",
                    help="run nothing: write the report over the runs that have finished so far")
    ap.add_argument("--dev", action="store_true",
                    help="on development tasks: streams drawn from labels no evaluation stream uses (NAME-dev); "
                    "make choices here, never on the evaluation streams")
    ap.add_argument("--seeds", nargs="+", type=int, metavar="SEED", help="only these seeds")
    ap.add_argument("--shard", metavar="I/N", help="knowledge comparisons (single mode): run every N-th passage from "
                    "the I-th (0 <= I < N) beside the other shards, e.g. one process per core or GPU; then run once "
                    "without --shard to assemble the results and write the report")
    ap.add_argument("--workers", type=int, metavar="N", help="evaluation.workers: up to N runs (method x seed) "
                    "at once on evaluation.runner, a local Dask cluster by default; results do not change")
    ap.add_argument("--device", choices=["cpu", "cuda", "auto"], help="model.device for every run (e.g. cuda where "
                    "a GPU is lent); results do not depend on it in their cache key")
    args = ap.parse_args(argv)
    if args.seeds and min(args.seeds) < 0:
        ap.error("--seeds: a seed is a non-negative integer")
    shard = None
    if args.shard is not None:
        m = re.fullmatch(r"(\d+)/(\d+)", args.shard)
        if not m or not 0 <= int(m[1]) < int(m[2]):
            ap.error(f"--shard: {args.shard!r} is not I/N with 0 <= I < N (e.g. 0/4)")
        shard = (int(m[1]), int(m[2]))
    if args.workers is not None and args.workers < 1:
        ap.error("--workers: at least 1")
    resolve_comparison(load_params(args.params), args.name, args.quick, args.methods)  # bad input: before a server
    with command_server("compare"):  # a server tethered to this command (flows/server.py), where none is set
        compare(args.name, args.params, args.quick, args.methods, args.report_only, args.dev, args.seeds, shard,
                args.device, args.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
