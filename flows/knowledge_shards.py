"""A knowledge comparison's passages as plain processes, without Prefect: issue #14's comparison on a lent GPU.

``lm-sleep compare NAME --shard I/N --device cuda`` runs a share of the passages through Prefect. A machine
lent for its accelerator often has only the ML stack (torch, transformers, pandas) and no package registry
to install Prefect from. This script runs the same tasks there, as plain functions (``flows/no_prefect``
stands in for the decorators and the run logger; every line of ML and every file written is the tasks'
own), and schedules them itself::

    python flows/knowledge_shards.py NAME --device cuda --procs 12 [--deadline 540] [--methods M ...]

Jobs, at most ``--procs`` processes at once: first the model is loaded once (the embedded GGUF is
converted into the cache); then the dream policy's ReST-EM training (once per seed, for the methods that
dream with the trained policy) and every other method's passages in shards, the dreaming methods in more
shards than the cheap ones; a trained-policy method's shards start when its policy is on disk. Each job
writes what ``lm-sleep compare NAME --shard I/N`` writes (``progress.shard-<i>-of-<n>.jsonl``, the dream
tables, the trained policy with its rounds), so that ``lm-sleep compare NAME`` on the project machine finds
every passage done, learns nothing again and writes the report. At ``--deadline`` seconds the jobs still
running are stopped; the passages they finished stay on disk and a rerun resumes.

A run's key holds its params, and those hold the checkout's absolute paths: run this in a checkout at the
same path as the one that assembles the report (``--root``, default: this checkout). Every process logs to
``<comparison dir>/shard-logs/``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Run as a script: the package's __init__ (which configures Prefect) is not imported, and the stand-in
# comes first on the path, so these processes never import Prefect even where it is installed.
sys.path[:0] = [str(ROOT / "flows" / "no_prefect"), str(ROOT)]
for _k, _v in {"DO_NOT_TRACK": "1", "GX_ANALYTICS_ENABLED": "false", "TOKENIZERS_PARALLELISM": "false",
               "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}.items():
    os.environ.setdefault(_k, _v)

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

from model.config import ConfigError, Params, load_params  # noqa: E402
from tasks.compare import comparison_dir, resolve_comparison, run_dir, run_params, write_run_params  # noqa: E402
from tasks.knowledge import (  # noqa: E402
    policy_dir,
    prepare_passages,
    run_knowledge_method,
    train_dream_policy,
    trains_a_policy,
    warm_model,
)

LOG_DIR = "shard-logs"
POLICY_FILE = "policy.json"  # what a policy job leaves for the trained-policy shards: {"policy": dir, "policy_sha256": ...}
#: Shards per method relative to ``--procs`` (a method's cost per passage: base only measures, the wake trains a
#: few steps, the dreaming methods sample, try and train dreams).
WEIGHT = {"base": 0.1, "passage_finetune": 0.2, "base_dreams": 0.6, "sleep": 0.6, "passage_dreams": 0.6,
          "passage_sleep": 0.8, "passage_sleep_trained": 1.0}

log = logging.getLogger("lm-sleep")


def _params(args: argparse.Namespace) -> tuple[Params, Path]:
    root = Path(args.root).resolve()
    params = load_params(root / "params.yaml")
    if args.device:
        params = params.for_run({"model": {"device": args.device}}, "--device").model_copy(
            update={"evaluation": params.evaluation})
    return params, root


def _job(args: argparse.Namespace) -> int:
    """One job in this process: ``--warm``, ``--policy SEED`` or ``--method M --seed S --shard I/N``."""
    params, root = _params(args)
    comp = resolve_comparison(params, args.name, args.quick)
    passages = prepare_passages(root, comp)
    cdir = comparison_dir(params, root, comp)
    if args.warm:
        p = run_params(params, root, comp, comp.methods[0], comp.seeds[0])
        log.info(f"model {warm_model(p, root)} loaded; {len(passages)} passages")
        return 0
    if args.policy is not None:
        method = next(m for m in comp.methods if trains_a_policy(m))
        p = run_params(params, root, comp, method, args.policy)
        trained = train_dream_policy(p, root, policy_dir(cdir, args.policy), comp.knowledge, passages)
        out = {"policy": trained["policy"], "policy_sha256": trained["policy_sha256"]}
        (policy_dir(cdir, args.policy) / POLICY_FILE).write_text(json.dumps(out), encoding="utf-8")
        log.info(f"dream policy, seed {args.policy}: {trained['policy_rounds']} rounds, sha256 {out['policy_sha256'][:12]}")
        return 0
    method, seed = args.method, args.seed
    i, n = (int(x) for x in args.shard.split("/"))
    p = run_params(params, root, comp, method, seed)
    digest = None
    if trains_a_policy(method):
        trained = json.loads((policy_dir(cdir, seed) / POLICY_FILE).read_text(encoding="utf-8"))
        p = p.for_run({"dream": {"policy": {"source": trained["policy"]}}}, f"{comp.name} ({method}, seed {seed})")
        digest = trained["policy_sha256"]
    rdir = run_dir(params, root, comp, method, seed)
    write_run_params(p, rdir / "params.yaml")
    res = run_knowledge_method(p, root, rdir, method, comp.knowledge, passages, digest, (i, n))
    log.info(f"{method} seed {seed} shard {i}/{n}: {len(res['passages'])} passages ({res['seconds']:.0f} s)")
    return 0


@dataclass
class Job:
    name: str
    argv: list[str]
    after: str | None = None  # the job that must have finished first
    proc: subprocess.Popen | None = None
    started: float = 0.0
    rc: int | None = None
    log_path: Path = field(default_factory=Path)


def _done_lines(cdir: Path) -> dict[str, int]:
    """Passages on disk per method: distinct (seed, passage) pairs over every shard's progress file (a line a crash
    cut short does not count; the assembling run checks each line's key)."""
    seen: dict[str, set[tuple[str, int]]] = {}
    for f in sorted(cdir.glob("*/seed-*/progress*.jsonl")):
        for line in f.read_text(encoding="utf-8").splitlines():
            try:
                index = int(json.loads(line)["index"])
            except (ValueError, KeyError, TypeError):
                continue
            seen.setdefault(f.parts[-3], set()).add((f.parts[-2], index))
    return {m: len(v) for m, v in seen.items()}


def _schedule(args: argparse.Namespace) -> int:
    params, root = _params(args)
    comp = resolve_comparison(params, args.name, args.quick, args.methods)
    if comp.kind != "knowledge" or comp.knowledge.mode != "single":
        raise ConfigError(f"comparison {comp.name!r}: knowledge_shards runs knowledge comparisons in mode single")
    cdir = comparison_dir(params, root, comp)
    logs = cdir / LOG_DIR
    logs.mkdir(parents=True, exist_ok=True)
    base = [sys.executable, str(Path(__file__).resolve()), comp.name, "--root", str(root)]
    base += (["--device", args.device] if args.device else []) + (["--quick"] if args.quick else [])
    n_passages = comp.knowledge.n_passages
    jobs: list[Job] = []
    for seed in comp.seeds:
        policy = f"policy-{seed}"
        if any(trains_a_policy(m) for m in comp.methods):
            jobs.append(Job(policy, base + ["--policy", str(seed)], after="warm"))
        for m in comp.methods:
            n = max(1, min(n_passages, round(args.procs * WEIGHT.get(m, 1.0))))
            jobs += [Job(f"{m}-{seed}-{i}of{n}", base + ["--method", m, "--seed", str(seed), "--shard", f"{i}/{n}"],
                         after=policy if trains_a_policy(m) else "warm") for i in range(n)]
    jobs.insert(0, Job("warm", base + ["--warm"]))
    for job in jobs:
        job.log_path = logs / f"{job.name}.log"
    start = time.monotonic()
    last_report = 0.0
    log.info(f"{comp.name}: {len(jobs)} jobs, at most {args.procs} at once, deadline {args.deadline or 'none'} s")
    while True:
        now = time.monotonic() - start
        for job in jobs:
            if job.proc is not None and job.rc is None and job.proc.poll() is not None:
                job.rc = job.proc.returncode
                log.info(f"{now:6.0f} s  {job.name}: {'done' if job.rc == 0 else f'FAILED (exit {job.rc})'} "
                         f"in {time.monotonic() - job.started:.0f} s")
                if job.rc != 0:
                    tail = job.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
                    log.error("\n".join(tail))
        finished = {j.name for j in jobs if j.rc == 0}
        failed = {j.name for j in jobs if j.rc not in (None, 0)}
        running = [j for j in jobs if j.proc is not None and j.rc is None]
        waiting = [j for j in jobs if j.proc is None]
        blocked = [j for j in waiting if j.after in failed]
        for j in blocked:  # what waits on a failed job never starts
            j.rc, j.proc = -1, None
            failed.add(j.name)
        waiting = [j for j in waiting if j not in blocked]
        if not running and not waiting:
            break
        if args.deadline and now > args.deadline:
            log.warning(f"{now:.0f} s: deadline; stopping {len(running)} jobs, {len(waiting)} not started")
            for j in running:
                j.proc.terminate()
            for j in running:
                try:
                    j.proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    j.proc.kill()
            break
        for j in waiting:
            if len(running) >= args.procs:
                break
            if j.after is None or j.after in finished:
                j.started = time.monotonic()
                with open(j.log_path, "w", encoding="utf-8") as out:
                    j.proc = subprocess.Popen(j.argv, stdout=out, stderr=subprocess.STDOUT, cwd=root)
                running.append(j)
        if now - last_report >= args.report_every:
            last_report = now
            log.info(f"{now:6.0f} s  running {len(running)}, waiting {len(waiting)}, passages on disk "
                     + json.dumps(_done_lines(cdir), sort_keys=True))
        time.sleep(1.0)
    done = _done_lines(cdir)
    log.info(f"{time.monotonic() - start:.0f} s: passages on disk {json.dumps(done, sort_keys=True)}; "
             f"{sum(j.rc == 0 for j in jobs)}/{len(jobs)} jobs finished")
    complete = all(done.get(m, 0) >= n_passages * len(comp.seeds) for m in comp.methods)
    if complete:
        log.info(f"every passage is on disk: `lm-sleep compare {comp.name}` on the project machine writes the report")
    return 0 if complete else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="knowledge_shards", description=__doc__.split("\n\n")[0])
    ap.add_argument("name", help="a knowledge comparison of params.yaml (mode single)")
    ap.add_argument("--root", default=str(ROOT), help="the project checkout (default: this one)")
    ap.add_argument("--device", help="model.device of every run (cuda on a GPU)")
    ap.add_argument("--quick", action="store_true", help="evaluation.quick's smoke sizes")
    ap.add_argument("--methods", nargs="+", help="only these methods")
    ap.add_argument("--procs", type=int, default=max(1, (os.cpu_count() or 2) - 1), help="processes at once")
    ap.add_argument("--deadline", type=float, default=0.0, help="stop the jobs still running after this many seconds")
    ap.add_argument("--report-every", type=float, default=30.0, help="seconds between progress lines")
    # one job (the scheduler starts these)
    ap.add_argument("--warm", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--policy", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--shard", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        if args.warm or args.policy is not None or args.method:
            return _job(args)
        return _schedule(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
