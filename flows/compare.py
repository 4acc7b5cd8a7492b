"""The compare flow: a named comparison of sleep with baselines and ablations (docs/design.md §5).

``lm-sleep compare NAME`` (or ``python -m flows.compare NAME``) runs every method of
``evaluation.comparisons.NAME`` on every seed, on the same data, model and budget, and
writes ``reports/NAME/``: a markdown table (mean and 95% CI over seeds), plots and DVC
metrics. Every seed's stream is built and checked before anything trains. The CMS
methods (cms, sleep and its ablations) run the lifecycle's own wake, sleep and evaluate
flows in a directory of their own, with the method's switches in its params.yaml; the
baselines run ``model/comparison.py``. Finished runs are kept, so a rerun after a crash
resumes; ``--quick`` applies ``evaluation.quick`` (a smoke run, for tests).

A comparison of ``kind: knowledge`` instead learns SQuAD passages (single passage or
continued pretraining) with base / passage_finetune / base_dreams / sleep and answers
their questions without context (``tasks/knowledge.py``, ``model/incorporation.py``);
its passages are checked before anything trains, and a run resumes mid-way.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

from prefect import flow, get_run_logger

from flows.evaluate import evaluate
from flows.sleep import sleep
from flows.wake import wake
from model.comparison import BASELINES
from model.config import BaselinesConfig, ConfigError, Params, load_params
from model.data import DataError
from model.io import BusyError, exclusive
from tasks.compare import (
    Comparison,
    cached_result,
    collect_cms_result,
    finished_results,
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
from tasks.compare_report import write_comparison_report
from tasks.expectations import StreamValidationError
from tasks.knowledge import prepare_passages, run_knowledge_method
from tasks.knowledge_report import write_knowledge_report


@flow(name="compare", log_prints=True)
def compare(name: str, params_path: str = "params.yaml", quick: bool = False, methods: list[str] | None = None,
            report_only: bool = False, dev: bool = False, seeds: list[int] | None = None) -> dict:
    """Run comparison ``name``: every method on every seed; then its report. Returns the report's summary.

    ``report_only``: run nothing; write the report over the runs that have finished (the rest are listed).
    ``dev``: the comparison on development tasks (``<name>-dev``, no evaluation label in its streams), where
    choices are made. ``seeds``: only these seeds."""
    log = get_run_logger()
    params = load_params(params_path)
    root = Path(params_path).resolve().parent
    comp = resolve_comparison(params, name, quick, methods)
    if seeds:
        comp = replace(comp, seeds=tuple(dict.fromkeys(seeds)))
    if dev:
        comp = development_comparison(params, root, comp)
    if report_only:
        results, missing = finished_results(params, root, comp)
        if not results:
            raise ConfigError(f"comparison {name!r}: no finished run under {comparison_dir(params, root, comp)}")
        if missing:
            log.warning(f"{name}: report over the finished runs; not run yet: "
                        + ", ".join(f"{m} (seed {s})" for m, s in missing))
        seeds = tuple(s for s in comp.seeds if any(r["seed"] == s for r in results))
        summary = write_comparison_report(params, root, replace(comp, seeds=seeds), results)
        log.info(f"report: {summary['report']}")
        return summary
    if comp.kind == "knowledge":
        return compare_knowledge(params, root, comp)
    with exclusive(comparison_dir(params, root, comp), "comparison run"):
        results = run_continual(params, root, comp)
        summary = write_comparison_report(params, root, comp, results)
    log.info(f"report: {summary['report']}")
    return summary


def run_continual(params: Params, root: Path, comp: Comparison, baselines: BaselinesConfig | None = None) -> list[dict]:
    """Every method of a continual comparison on every seed (finished runs are read back); their results.

    ``baselines``: the settings of every baseline run (default: ``evaluation.baselines`` with each method's
    own learning rate from ``evaluation.lrs``). The caller holds the comparison directory's lock."""
    log = get_run_logger()
    streams = prepare_streams(params, root, comp)  # bad data fails here, before any training
    runs = [(seed, m) for seed in comp.seeds for m in comp.methods]
    results = []
    for i, (seed, method) in enumerate(runs, 1):
        p = run_params(params, root, comp, method, seed)
        rdir = run_dir(params, root, comp, method, seed)
        log.info(f"[{i}/{len(runs)}] {method}, seed {seed} ({rdir.relative_to(root)})")
        stream, plan = streams[seed]
        if method in BASELINES:
            settings = baselines if baselines is not None else method_baselines(params, method)
            res = run_baseline_method(p, settings, rdir, method, stream, plan)
        else:
            res = cached_result(rdir, run_key(p, method))
            if res is None:
                params_file = str(write_run_params(p, rdir / "params.yaml"))
                start = time.perf_counter()
                rows = []
                for period in sorted(plan):
                    wake(period, params_file)
                    sleep(period, params_file)
                    rows.append(evaluate(period, params_file, summary=False))
                res = collect_cms_result(p, rdir, method, rows, time.perf_counter() - start)
        final = res["accuracy"][-1]
        log.info(f"[{i}/{len(runs)}] {method}, seed {seed}: final accuracy "
                 + " ".join(f"{a:.2f}" for a in final.values()) + f" ({res['seconds']:.0f} s)")
        results.append(res)
    return results


def compare_knowledge(params: Params, root: Path, comp: Comparison) -> dict:
    """A knowledge-incorporation comparison: every method on every seed over the passages; then its report."""
    log = get_run_logger()
    results = []
    with exclusive(comparison_dir(params, root, comp), "comparison run"):
        passages = prepare_passages(root, comp)  # a missing file or too few passages fails here, before training
        runs = [(seed, m) for seed in comp.seeds for m in comp.methods]
        for i, (seed, method) in enumerate(runs, 1):
            p = run_params(params, root, comp, method, seed)
            rdir = run_dir(params, root, comp, method, seed)
            log.info(f"[{i}/{len(runs)}] {method}, seed {seed} ({rdir.relative_to(root)})")
            write_run_params(p, rdir / "params.yaml")
            res = run_knowledge_method(p, root, rdir, method, comp.knowledge, passages)
            tau = sum(r["tau"] for r in res["passages"]) / len(res["passages"])
            log.info(f"[{i}/{len(runs)}] {method}, seed {seed}: mean tau {tau:.3f} ({res['seconds']:.0f} s)")
            results.append(res)
        summary = write_knowledge_report(params, root, comp, results)
    log.info(f"report: {summary['report']}")
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lm-sleep compare", description="Run a named comparison of params.yaml "
                                 "(evaluation.comparisons) and write reports/<name>/.")
    ap.add_argument("name", help="the comparison, e.g. default or ablations")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--quick", action="store_true", help="apply evaluation.quick: a small smoke run")
    ap.add_argument("--methods", nargs="+", help="only these methods of the comparison")
    ap.add_argument("--report-only", action="store_true",
                    help="run nothing: write the report over the runs that have finished so far")
    ap.add_argument("--dev", action="store_true",
                    help="on development tasks: streams drawn from labels no evaluation stream uses (NAME-dev); "
                    "make choices here, never on the evaluation streams")
    ap.add_argument("--seeds", nargs="+", type=int, metavar="SEED", help="only these seeds")
    args = ap.parse_args(argv)
    if args.seeds and min(args.seeds) < 0:
        ap.error("--seeds: a seed is a non-negative integer")
    try:
        compare(args.name, args.params, args.quick, args.methods, args.report_only, args.dev, args.seeds)
    except (ConfigError, DataError, StreamValidationError, BusyError) as e:
        print(f"compare {args.name} failed: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
