"""Deployments of the lm-sleep flows, read from prefect.yaml, and the command that serves them.

prefect.yaml is the one definition of the deployments (names, entrypoints, parameters,
schedules, triggers): ``prefect deploy --all`` reads it for the process work pool, and
``build_deployments`` reads it here for ``prefect.serve``, which runs the flows itself,
without a work pool or worker. Schedules and triggers need a real Prefect server (the
ephemeral API refuses them), so ``serve`` checks PREFECT_API_URL first.

Run as ``python -m flows.deployments --params params.yaml`` (``lm-sleep serve``).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import sys
from pathlib import Path
from typing import Any

import yaml
from prefect import Flow, get_client
from prefect import serve as prefect_serve
from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.events import DeploymentTriggerTypes
from prefect.schedules import Schedule
from prefect.settings import PREFECT_API_URL
from pydantic import TypeAdapter, ValidationError

PREFECT_YAML = Path(__file__).resolve().parents[1] / "prefect.yaml"
START_SERVER = (
    "start a server with: prefect server start --host 127.0.0.1 --port 4200; "
    "export PREFECT_API_URL=http://127.0.0.1:4200/api"
)

# Keys of a prefect.yaml deployment that a served deployment uses; the others only
# matter to `prefect deploy` (a served deployment has no work pool and no pull step).
SERVED_KEYS = {"name", "entrypoint", "description", "tags", "parameters", "schedules", "triggers",
               "concurrency_limit", "paused"}
DEPLOY_ONLY_KEYS = {"work_pool", "build", "push", "pull", "version", "version_type", "enforce_parameter_schema"}
SCHEDULE_KEYS = {"cron", "interval", "rrule", "timezone", "anchor_date", "day_or", "active", "parameters", "slug"}

_TRIGGER = TypeAdapter(DeploymentTriggerTypes)


class DeploymentSpecError(ValueError):
    """prefect.yaml has a deployment this module cannot build as written."""


class ServerUnavailableError(RuntimeError):
    """No Prefect server to register schedules and triggers with."""


def read_deployment_specs(prefect_yaml: str | Path = PREFECT_YAML) -> list[dict[str, Any]]:
    """The ``deployments`` list of prefect.yaml, each checked for keys this module understands."""
    path = Path(prefect_yaml)
    specs = (yaml.safe_load(path.read_text()) or {}).get("deployments") or []
    if not specs:
        raise DeploymentSpecError(f"{path}: no deployments")
    for spec in specs:
        unknown = set(spec) - SERVED_KEYS - DEPLOY_ONLY_KEYS
        if unknown or not {"name", "entrypoint"} <= set(spec):
            raise DeploymentSpecError(
                f"{path}: deployment {spec.get('name')!r} needs name and entrypoint; unknown keys {sorted(unknown)}"
            )
    return specs


def load_flow(entrypoint: str) -> Flow:
    """The flow of a prefect.yaml entrypoint, imported as a module: ``flows/wake.py:wake`` -> ``flows.wake.wake``."""
    file, _, name = entrypoint.partition(":")
    module = importlib.import_module(file.removesuffix(".py").replace("/", "."))
    flow = getattr(module, name, None)
    if not isinstance(flow, Flow):
        raise DeploymentSpecError(f"entrypoint {entrypoint!r} is not a Prefect flow")
    return flow


def to_schedule(spec: dict[str, Any]) -> Schedule:
    """One prefect.yaml schedule (cron, interval in seconds, or rrule; timezone, active, ...) as a Prefect schedule."""
    unknown = set(spec) - SCHEDULE_KEYS
    if unknown:
        raise DeploymentSpecError(f"schedule {spec}: unknown keys {sorted(unknown)}")
    spec = dict(spec)
    if isinstance(spec.get("interval"), (int, float)):
        spec["interval"] = datetime.timedelta(seconds=spec["interval"])
    if isinstance(spec.get("anchor_date"), str):
        spec["anchor_date"] = datetime.datetime.fromisoformat(spec["anchor_date"])
    if sum(spec.get(k) is not None for k in ("cron", "interval", "rrule")) != 1:
        raise DeploymentSpecError(f"schedule {spec}: exactly one of cron, interval, rrule")
    return Schedule(**spec)


def to_trigger(spec: dict[str, Any]) -> DeploymentTriggerTypes:
    """One prefect.yaml trigger as a deployment trigger (an automation owned by the deployment)."""
    try:
        return _TRIGGER.validate_python(spec)
    except ValidationError as e:
        raise DeploymentSpecError(f"trigger {spec}: {e}") from e


def build_deployments(
    params_path: str | Path = "params.yaml", prefect_yaml: str | Path = PREFECT_YAML
) -> list[RunnerDeployment]:
    """The deployments of prefect.yaml, ready for ``prefect.serve``.

    Every ``params_path`` parameter becomes the absolute path of ``params_path``, so runs do not
    depend on the serving process's working directory; trigger parameters stay templates that
    the server renders from the triggering event when it fires.
    """
    params_file = str(Path(params_path).resolve())
    deployments = []
    for spec in read_deployment_specs(prefect_yaml):
        parameters = dict(spec.get("parameters") or {})
        if "params_path" in parameters:
            parameters["params_path"] = params_file
        deployments.append(
            load_flow(spec["entrypoint"]).to_deployment(
                name=spec["name"],
                description=spec.get("description"),
                tags=spec.get("tags"),
                parameters=parameters,
                schedules=[to_schedule(s) for s in spec.get("schedules") or []] or None,
                triggers=[to_trigger(t) for t in spec.get("triggers") or []] or None,
                concurrency_limit=spec.get("concurrency_limit"),
                paused=spec.get("paused"),
                entrypoint_type=EntrypointType.MODULE_PATH,
            )
        )
    return deployments


def check_server() -> str:
    """The API URL of a Prefect server that answers; ServerUnavailableError saying how to start one otherwise."""
    url = PREFECT_API_URL.value()
    if not url:
        raise ServerUnavailableError(
            f"PREFECT_API_URL is not set: schedules and triggers need a Prefect server; {START_SERVER}"
        )
    with get_client(sync_client=True) as client:
        error = client.api_healthcheck()
    if error is not None:
        raise ServerUnavailableError(
            f"no Prefect server answers at PREFECT_API_URL={url} ({type(error).__name__}: {error}); {START_SERVER}"
        )
    return url


def serve(
    params_path: str | Path = "params.yaml", limit: int | None = 1, prefect_yaml: str | Path = PREFECT_YAML
) -> None:
    """Register the deployments with the server and run their flows until interrupted.

    ``limit`` caps the flow runs executing at once (None: no cap); the default 1 queues a
    triggered sleep behind a running lifecycle instead of two model jobs sharing the CPUs
    and the state directory.
    """
    url = check_server()
    deployments = build_deployments(params_path, prefect_yaml)
    print(f"serving {len(deployments)} deployments from {prefect_yaml} on {url}")
    prefect_serve(*deployments, limit=limit)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (``lm-sleep serve``); a non-zero exit code with a one-line error."""
    parser = argparse.ArgumentParser(
        prog="lm-sleep serve",
        description="Serve the deployments of prefect.yaml (schedules, triggers) on a Prefect server.",
    )
    parser.add_argument("--params", default="params.yaml", help="params file the flows run with (default: params.yaml)")
    parser.add_argument("--limit", type=int, default=1, help="flow runs at once; 0 for no cap (default: 1)")
    parser.add_argument("--prefect-yaml", default=str(PREFECT_YAML), help="deployments file (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        serve(args.params, args.limit or None, args.prefect_yaml)
    except (ServerUnavailableError, DeploymentSpecError) as e:
        print(f"serve failed: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
