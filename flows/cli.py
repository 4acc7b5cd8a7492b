"""``lm-sleep``: the command line of the pipeline.

    lm-sleep run                 the main job: `dvc repro` of prepare -> cycles -> report -> publish,
                                 with one Prefect server on 127.0.0.1 for all stages; prints the
                                 summary and the time orchestration added
    lm-sleep run --no-dvc        the same work as one Prefect flow (the `lifecycle` flow), no DVC
    lm-sleep prepare | wake | sleep | evaluate | report | publish    one stage
    lm-sleep compare NAME        a comparison of params.yaml (evaluation.comparisons): sleep vs baselines
                                 and ablations over seeds -> reports/NAME/ (--quick: a smoke run)
    lm-sleep lr-search           every tunable method x evaluation.lr_search.grid on development tasks
                                 -> reports/lr-search/ (the choice per method for params.yaml)
    lm-sleep ingest PATH|s3://B/K  new data into the inbox (checked row by row; bad rows to quarantine)
    lm-sleep wake --inbox | sleep --inbox | cycle    the next inbox period: every batch no wake has
                                 consumed, exactly once (cycle = wake, sleep and evaluate)
    lm-sleep serve               serve the deployments of prefect.yaml (needs a Prefect server)
    lm-sleep predict | generate --state PERIOD|PATH    ask a trained state: top labels of texts, or
                                 continuations of prompts (JSONL out)
    lm-sleep export --state PERIOD|PATH --out DIR      a state as a Hugging Face directory
    lm-sleep artifacts ...       list, fetch, open artifacts of a run; flush uploads; DVC remote
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
# The same numbers on a busy machine: with dynamic threading on (MKL's default), Intel's OpenMP may run a GEMM on
# fewer threads when the load is high, which splits its sums differently (a fresh-clone `make run` beside the
# test suite started its first wake loss at 12.54541 instead of 12.54535, and ended at another accuracy).
# Read when MKL starts: before torch is imported here, and inherited by every stage DVC starts.
os.environ.setdefault("MKL_DYNAMIC", "FALSE")
os.environ.setdefault("OMP_DYNAMIC", "FALSE")
# MKL's strict conditional numerical reproducibility: its results independent of the arrays' memory alignment (which
# MKL documents them to depend on otherwise), at no measured cost. What made reruns differ here was an atomic-add race
# in torch, which the stages' deterministic algorithms remove (model/runtime.py; docs/results/issue13/rerun-exact/).
# Read when MKL starts; a user's own MKL_CBWR wins.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
# torch's deterministic algorithms (model/runtime.py) on a GPU need cuBLAS's fixed-size workspace, read when CUDA
# starts; without it cuBLAS may split a sum differently from one call to the next.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

TIMINGS = Path("metrics/timings/orchestration.json")


def _task_seconds(since: dt.datetime, tag: str | None = None) -> tuple[float, int]:
    """Total duration of the Prefect task runs that started after ``since`` (and their number); with ``tag``,
    only the task runs of the flow runs that carry it (the job's flows tag their own runs, not their tasks':
    flows.stage.tag_job_run).

    A subflow called from a flow has a task run of its own in the parent, which lasts as long as the
    subflow and its tasks: it is left out, or the subflow's tasks would count twice."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterStartTime, FlowRunFilterTags,
                                                TaskRunFilter, TaskRunFilterFlowRunId, TaskRunFilterStartTime)

    flow_tagged = {"tags": FlowRunFilterTags(all_=[tag])} if tag else {}
    with get_client(sync_client=True) as client:
        flows_ = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(start_time=FlowRunFilterStartTime(after_=since), **flow_tagged), limit=None)
        of_job = {"flow_run_id": TaskRunFilterFlowRunId(any_=[f.id for f in flows_])} if tag else {}
        runs = client.read_task_runs(
            task_run_filter=TaskRunFilter(start_time=TaskRunFilterStartTime(after_=since), **of_job), limit=None)
    wrappers = {f.parent_task_run_id for f in flows_ if f.parent_task_run_id is not None}
    tasks_ = [r for r in runs if r.id not in wrappers]
    total = sum(r.total_run_time.total_seconds() for r in tasks_ if r.total_run_time)
    return total, len(tasks_)


def cmd_run(args: argparse.Namespace) -> int:
    """The main job. With DVC: one local Prefect server, then `dvc repro`; report the orchestration time."""
    from flows.server import local_server
    from flows.stage import ENV as STAGE_SERVER_ENV
    from flows.stage import JOB_ENV, job_tag, stage_server

    root = Path(args.params).resolve().parent
    since = dt.datetime.now(dt.timezone.utc)
    os.environ[JOB_ENV] = job = uuid.uuid4().hex  # the stages DVC starts tag their runs with it
    t0 = time.perf_counter()
    def start_stages(url: str) -> None:  # while the Prefect server starts (flows/server.py)
        os.environ["PREFECT_API_URL"] = url  # for the processes this one starts (DVC, the stage server)
        if not args.no_dvc:  # one process imports torch & co. once; each DVC stage forks from it
            os.environ[STAGE_SERVER_ENV] = stack.enter_context(stage_server(params=args.params))

    with contextlib.ExitStack() as stack, local_server(root / ".prefect-server.log", while_starting=start_stages) as url:
        # and for this process: Prefect read its settings when it was imported (the error classes import
        # it), so without this `--no-dvc` would start a temporary API of its own beside the server
        from prefect.settings import PREFECT_API_URL, temporary_settings

        stack.enter_context(temporary_settings(updates={PREFECT_API_URL: url}))
        t_server = time.perf_counter() - t0
        if args.no_dvc:
            from flows.lifecycle import lifecycle
            from flows.prepare import prepare
            from flows.publish import main as publish_main
            from model.config import load_params

            prepare(args.params)  # the flows tag their runs with the job (JOB_ENV; flows.stage.tag_job_run)
            lifecycle(args.params)
            # As the DVC pipeline's publish stage does: send what is still queued, and exit 1 (with the store's
            # error) while anything stays queued, so a scheduler sees it. A finished run's objects are not re-sent.
            if load_params(args.params).lifecycle.publish and (code := publish_main(["--params", args.params])):
                return code
        else:
            cmd = ["dvc", "repro", *(["--force"] if args.force else []), "dvc.yaml"]  # not pipelines/inbox
            proc = subprocess.run(cmd, cwd=root, env=dict(os.environ))
            if proc.returncode != 0:
                return proc.returncode
        total = time.perf_counter() - t0
        task_s, n_tasks = _task_seconds(since, job_tag(job))
    overhead = total - task_s
    timings = {"total_s": round(total, 1), "servers_start_s": round(t_server, 1), "task_runs": n_tasks,
               "task_s": round(task_s, 1), "orchestration_s": round(overhead, 1),
               "orchestration_share": round(overhead / total, 4) if total else None,
               "mode": "lifecycle flow" if args.no_dvc else "dvc repro"}
    out = root / TIMINGS
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(timings, indent=2) + "\n")
    print(f"main job: {total:.0f} s, of which Prefect tasks {task_s:.0f} s ({n_tasks} runs); orchestration "
          f"(process starts, imports, API, DVC) {overhead:.0f} s = {100 * overhead / total:.1f}% -> {out}")
    return 0


def _stage(name: str):
    def run(args: argparse.Namespace) -> int:
        from flows.server import command_server

        with command_server(name):  # under `lm-sleep run` the job's server; alone, one tethered to this command
            return _run_stage(name, args)
    return run


def _run_stage(name: str, args: argparse.Namespace) -> int:
    """One stage of the lifecycle as its own command (its flow module's main)."""
    argv = ["--params", args.params]
    if getattr(args, "inbox", False):
        from flows.intake import sleep_inbox, wake_inbox
        from flows.locked import run_locked

        return run_locked(f"{name} --inbox", args.params, wake_inbox if name == "wake" else sleep_inbox,
                          args.params)
    if getattr(args, "period", None) is not None:
        argv += ["--period", str(args.period)]
    if name == "sleep":
        argv += ["--stage", args.stage]
    if name == "publish" and args.run_id:
        argv += ["--run-id", args.run_id]
    module = __import__(f"flows.{name}", fromlist=["main"])
    return module.main(argv) or 0


#: Subcommands with a parser of their own: name -> (module whose main(argv) runs it, help).
DELEGATED = {
    "compare": ("flows.compare", "run a named comparison (evaluation.comparisons) -> reports/NAME/"),
    "paired": ("flows.paired", "two sets of runs (e.g. a method rerun against earlier baselines), paired over their "
               "common seeds: intervals of each and of A - B"),
    "lr-search": ("flows.lr_search", "the same learning-rate search for every method, on development tasks "
                  "(evaluation.lr_search) -> reports/lr-search/"),
    "ingest": ("flows.intake:main_ingest", "put a file (or s3://BUCKET/KEY) of new data into the inbox; "
               "bad rows to quarantine"),
    "rebuild": ("flows.intake:main_rebuild", "rebuild a past inbox period from the ledger, byte for byte"),
    "replay": ("flows.intake:main", "replay a finished inbox period in place (the DVC stage of pipelines/inbox/dvc.yaml)"),
    "cycle": ("flows.intake:main_cycle", "wake on every new inbox batch, then sleep and evaluate (one period)"),
    "serve": ("flows.deployments", "serve the deployments of prefect.yaml (needs PREFECT_API_URL)"),
    "predict": ("flows.model_cli:predict_main", "the top labels of texts (a file or stdin) under a state -> JSONL"),
    "generate": ("flows.model_cli:generate_main", "continuations of prompts under a state -> JSONL"),
    "export": ("flows.model_cli:export_main", "a state as a Hugging Face directory (trust_remote_code)"),
}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lm-sleep", description="Continual learning with wake/sleep cycles.")
    ap.add_argument("--debug", action="store_true", help="before the command (lm-sleep --debug wake ...): an "
                    "error in the input prints its traceback instead of one line (also LM_SLEEP_DEBUG=1)")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="the main job (dvc repro of the whole lifecycle)")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--no-dvc", action="store_true", help="run prepare + the lifecycle flow in this process, no DVC")
    p.add_argument("--force", action="store_true", help="dvc repro --force: rerun every stage")
    p.set_defaults(func=cmd_run)
    for name, help_text, period in (
        ("prepare", "build and validate the stream", False),
        ("wake", "one wake period", True),
        ("sleep", "the sleep after a wake period", True),
        ("evaluate", "accuracy after a cycle's sleep", True),
        ("report", "the lifecycle report (markdown + PNG)", False),
        ("publish", "publish the evaluated cycles to the artifact store", False),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--params", default="params.yaml")
        if period:
            which = p.add_mutually_exclusive_group(required=True)
            which.add_argument("--period", type=int, help="a period of the prepared stream")
            if name in ("wake", "sleep"):
                which.add_argument("--inbox", action="store_true", help="the next inbox period: the batches "
                                   "`lm-sleep ingest` accepted that no wake has consumed (wake), or its sleep")
        if name == "sleep":
            p.add_argument("--stage", choices=["all", "consolidate", "dream"], default="all")
        if name == "publish":
            p.add_argument("--run-id", default=None)
        p.set_defaults(func=_stage(name))
    for name, help_text in DELEGATED.items():  # their own parsers (main() hands them argv, -h included)
        sub.add_parser(name, help=help_text[1], add_help=False).add_argument("rest", nargs=argparse.REMAINDER)
    from flows.artifacts import add_artifacts_parser

    add_artifacts_parser(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    """Run one command. Bad input (a params, data or state file, an argument; flows/errors.py) is one line
    naming the file and the field on stderr and exit 1; ``--debug`` first shows the traceback instead."""
    from flows.errors import DEBUG_ENV, debugging, expected, report
    from model.config import load_params, run_id_problem
    from model.errors import ArgumentError

    argv = sys.argv[1:] if argv is None else list(argv)
    while argv and argv[0] == "--debug":  # a global option, before the command
        argv.pop(0)
        os.environ[DEBUG_ENV] = "1"  # the stages a run starts inherit it
    command = argv[0] if argv else ""
    try:
        if command in DELEGATED:  # `lm-sleep compare -h` is compare's own help
            module_name, _, func = DELEGATED[command][0].partition(":")
            entry = getattr(__import__(module_name, fromlist=["main"]), func or "main")
            return int(entry(argv[1:]) or 0)
        args = build_parser().parse_args(argv)
        command = args.command
        if getattr(args, "run_id", None) and (why := run_id_problem(args.run_id)):  # before any upload starts
            raise ArgumentError(f"{'--run-id' if command == 'publish' else 'RUN_ID'}: {why}")
        if getattr(args, "params", None):  # bad params stop every stage before a server or a flow run starts
            load_params(args.params)
        return int(args.func(args) or 0)
    except Exception as err:
        if debugging() or not expected(err):
            raise
        return report(f"lm-sleep {command}", err)


if __name__ == "__main__":
    sys.exit(main())
