"""Deployments from prefect.yaml on a real Prefect server on 127.0.0.1: schedules, the
wake -> sleep trigger, a served run and a worker run of `prepare` on the toy project."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from prefect import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.filters import DeploymentFilter
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.states import Completed
from prefect.workers.process import ProcessWorker

from flows.deployments import (
    PREFECT_YAML,
    DeploymentSpecError,
    ServerUnavailableError,
    build_deployments,
    main,
    read_deployment_specs,
    serve,
)
from tests.flows.helpers import free_port, stop, wait_for
from tests.flows.test_lifecycle_flow import toy_project

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SPEC = yaml.safe_load(PREFECT_YAML.read_text())
NAMES = ["wake-on-new-data", "sleep-nightly", "report-weekly", "lifecycle", "prepare", "wake", "sleep-after-wake"]
FULL_NAMES = {"wake-on-new-data": "wake-inbox/wake-on-new-data", "sleep-nightly": "sleep-inbox/sleep-nightly",
              "report-weekly": "report/report-weekly", "lifecycle": "lifecycle/lifecycle", "prepare": "prepare/prepare",
              "wake": "wake/wake", "sleep-after-wake": "sleep/sleep-after-wake"}
SCHEDULED = {"wake-on-new-data": (None, 600.0), "sleep-nightly": ("0 2 * * *", None),
             "report-weekly": ("0 6 * * 1", None)}


def _schedules(d) -> list[tuple]:
    return [(getattr(s.schedule, "cron", None),
             s.schedule.interval.total_seconds() if getattr(s.schedule, "interval", None) else None, s.active)
            for s in d.schedules or []]


@pytest.fixture(scope="module")
def toy_params(tmp_path_factory) -> Path:
    return toy_project(tmp_path_factory.mktemp("toy"))


@pytest.fixture(scope="module")
def registered(prefect_server, toy_params) -> dict[str, Any]:
    """The deployments of prefect.yaml as ``lm-sleep serve`` registers them (before it starts polling)."""
    return {d.name: d.apply() for d in build_deployments(toy_params)}


def read_deployment(name: str):
    with get_client(sync_client=True) as client:
        return client.read_deployment_by_name(FULL_NAMES[name])


def flow_runs_of(deployment_id) -> list:
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(deployment_filter=DeploymentFilter(id={"any_": [deployment_id]}))


def test_prefect_yaml_agrees_with_the_built_deployments(toy_params):
    specs = read_deployment_specs()
    assert [s["name"] for s in specs] == NAMES
    built = {d.name: d for d in build_deployments(toy_params)}
    assert list(built) == NAMES
    for spec in specs:
        d = built[spec["name"]]
        assert d.entrypoint == spec["entrypoint"].replace(".py:", ".").replace("/", ".")  # module path
        # params_path is the served params file, made absolute; nothing else is added or lost.
        assert d.parameters == spec["parameters"] | {"params_path": str(toy_params)}
        assert d.tags == spec["tags"] and d.description == spec["description"]
        assert d.work_pool_name is None  # served: no pool; `prefect deploy` uses the spec's pool
        assert spec["work_pool"]["name"] == "lm-sleep"
        want = [(s.get("cron"), float(s["interval"]) if "interval" in s else None, s["active"])
                for s in spec.get("schedules", [])]
        assert _schedules(d) == want
    for name, (cron, interval) in SCHEDULED.items():
        assert _schedules(built[name]) == [(cron, interval, True)]
    assert built["wake-on-new-data"].concurrency_limit == built["sleep-nightly"].concurrency_limit == 1
    (trigger,) = built["sleep-after-wake"].triggers
    assert trigger.expect == {"prefect.flow-run.Completed"}
    assert [dict(m.root) for m in trigger.match_related] == [
        {"prefect.resource.role": "flow", "prefect.resource.name": "wake"},
        {"prefect.resource.role": "deployment", "prefect.resource.name": "wake"},
    ]
    assert trigger.parameters == {"period": "{{ flow_run.parameters.period }}",
                                  "params_path": "{{ flow_run.parameters.params_path }}"}
    assert SPEC["pull"] == [{"prefect.deployments.steps.set_working_directory": {"directory": "{{ $LM_SLEEP_ROOT }}"}}]
    assert SPEC["build"] is None and SPEC["push"] is None


def test_a_misspelt_key_in_prefect_yaml_is_an_error(tmp_path):
    spec = yaml.safe_load(PREFECT_YAML.read_text())
    spec["deployments"][0]["schedule"] = spec["deployments"][0].pop("schedules")
    (tmp_path / "prefect.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(DeploymentSpecError, match=r"wake-on-new-data.*unknown keys \['schedule'\]"):
        read_deployment_specs(tmp_path / "prefect.yaml")


def test_serve_without_a_server_says_how_to_start_one(capsys):
    hint = "prefect server start --host 127.0.0.1 --port 4200"
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        with pytest.raises(ServerUnavailableError, match=f"PREFECT_API_URL is not set.*{hint}"):
            serve("params.yaml")
    with temporary_settings(updates={PREFECT_API_URL: f"http://127.0.0.1:{free_port()}/api"}):
        assert main(["--params", "params.yaml"]) == 2
    err = capsys.readouterr().err
    assert "serve failed: no Prefect server answers at PREFECT_API_URL=http://127.0.0.1:" in err and hint in err


def test_deployments_register_with_their_schedules_and_trigger(registered, toy_params):
    for name, (cron, interval) in SCHEDULED.items():
        d = read_deployment(name)
        assert d.id == registered[name] and _schedules(d) == [(cron, interval, True)]
        assert d.parameters == {"params_path": str(toy_params)} and not d.paused
    for name in ("lifecycle", "prepare", "wake", "sleep-after-wake"):
        assert read_deployment(name).schedules == []
    with get_client(sync_client=True) as client:
        (automation,) = client.read_automations_by_name("sleep-after-wake__automation_1")
    assert automation.enabled and automation.trigger.expect == {"prefect.flow-run.Completed"}
    (action,) = automation.actions
    assert action.deployment_id == registered["sleep-after-wake"]
    assert action.parameters == {"period": "{{ flow_run.parameters.period }}",
                                 "params_path": "{{ flow_run.parameters.params_path }}"}


def test_a_completed_wake_run_starts_a_sleep_for_the_same_period(registered, toy_params):
    """The server's trigger renders the wake run's parameters into the sleep run (period stays an int).

    The wakes are not run here: a forced Completed state emits the same server event. A wake
    without a deployment (a lifecycle's subflow) completes first and must not start a sleep.
    """
    from flows.wake import wake

    with get_client(sync_client=True) as client:
        subflow = client.create_flow_run(wake, parameters={"period": 0, "params_path": str(toy_params)})
        client.set_flow_run_state(subflow.id, Completed(), force=True)
        deployed = client.create_flow_run_from_deployment(
            registered["wake"], parameters={"period": 1, "params_path": str(toy_params)}
        )
        client.set_flow_run_state(deployed.id, Completed(), force=True)
    (sleep_run,) = wait_for(lambda: flow_runs_of(registered["sleep-after-wake"]), 30, "the triggered sleep run")
    assert sleep_run.parameters == {"period": 1, "params_path": str(toy_params)}
    assert sleep_run.state_name == "Scheduled"
    with get_client(sync_client=True) as client:
        client.delete_flow_run(sleep_run.id)  # nobody should run a sleep without its wake


def test_served_prepare_and_inbox_runs_complete(registered, toy_params, prefect_server, server_env, prefect_home,
                                                tmp_path):
    from flows.intake import ingest
    from model.data.intake import LEDGER_FILE, read_ledger
    from tests.flows.test_intake_flow import _batch as new_batch
    from tests.flows.test_intake_flow import _project as inbox_project

    inbox_root = tmp_path / "inbox-project"
    inbox_root.mkdir()
    log = prefect_home / "serve.log"
    env = server_env | {"PREFECT_API_URL": prefect_server, "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flows.deployments", "--params", str(toy_params)],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        # A second registration by the serve process itself, then runs of the served deployments.
        wait_for(lambda: proc.poll() is None and read_deployment("prepare").status.value == "READY", 60,
                 "the serve process polling", log)
        run = run_deployment(FULL_NAMES["prepare"], timeout=90, poll_interval=1)
        assert run.state_name == "Completed", log.read_text()[-3000:]
        assert run.parameters == {"params_path": str(toy_params)}
        # New data arrives; the inbox deployments take it in: a wake on it, then its sleep.
        inbox_params = str(inbox_project(inbox_root))
        batch = ingest(new_batch(inbox_root, "a", ["alarm", "music"]), inbox_params)
        for name in ("wake-on-new-data", "sleep-nightly", "wake-on-new-data"):
            run = run_deployment(FULL_NAMES[name], parameters={"params_path": inbox_params}, timeout=180,
                                 poll_interval=1)
            assert run.state_name == "Completed", log.read_text()[-3000:]
    finally:
        stop(proc)
    ledger = read_ledger(inbox_root / "state/inbox" / LEDGER_FILE)
    assert [(p["period"], p["batches"], p["status"]) for p in ledger.periods] == [(0, [batch["id"]], "done")]
    # (the last wake: a no-op)
    assert (inbox_root / "state/sleep/period-0/manifest.json").is_file()
    root = toy_params.parent
    assert (root / "data/processed/stream.parquet").is_file() and (root / "data/processed/tasks.json").is_file()
    assert (root / "reports/prepare/validation.md").is_file()


def test_prefect_deploy_registers_the_same_deployments_and_a_worker_runs_them(
    registered, tmp_path, prefect_server, server_env
):
    env = server_env | {"PREFECT_API_URL": prefect_server}
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(
            name="lm-sleep", type="process", base_job_template=ProcessWorker.get_default_base_job_template()))
    digest = hashlib.sha256(PREFECT_YAML.read_bytes()).hexdigest()
    deploy = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]
    assert hashlib.sha256(PREFECT_YAML.read_bytes()).hexdigest() == digest
    for spec in SPEC["deployments"]:
        d = read_deployment(spec["name"])
        assert d.id == registered[spec["name"]]  # the same deployment, now on the work pool
        assert (d.entrypoint, d.parameters, d.work_pool_name) == (spec["entrypoint"], spec["parameters"], "lm-sleep")
        assert d.pull_steps == SPEC["pull"]
        assert _schedules(d) == [(s.get("cron"), float(s["interval"]) if "interval" in s else None, s["active"])
                                 for s in spec.get("schedules", [])]
    with get_client(sync_client=True) as client:
        assert len(client.read_automations_by_name("sleep-after-wake__automation_1")) == 1  # replaced, not doubled

    # A process worker runs a prepare from the checkout named by LM_SLEEP_ROOT (its pull step).
    params = toy_project(tmp_path)
    run = run_deployment(FULL_NAMES["prepare"], parameters={"params_path": str(params)}, timeout=0)
    worker = subprocess.run([sys.executable, "-m", "prefect", "worker", "start", "--pool", "lm-sleep", "--run-once"],
                            cwd=tmp_path, env=env | {"LM_SLEEP_ROOT": str(REPO)}, capture_output=True, text=True,
                            timeout=120)
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(run.id).state
    assert state.is_completed(), worker.stdout[-3000:] + worker.stderr[-3000:]
    assert (tmp_path / "data/processed/stream.parquet").is_file()
