"""Importing ``flows`` is cheap: the stage client (every DVC stage's command) must not pay for Prefect."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("prefect", "torch", "transformers", "great_expectations", "pandas")


def _python(code: str) -> str:
    drop = {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "LM_SLEEP_FLOW_HEARTBEATS"}  # Prefect's default and ours
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          check=True, timeout=120).stdout.strip().splitlines()[-1]


def test_the_stage_client_imports_no_heavy_package():
    loaded = json.loads(_python(
        "import json, sys, flows.stage; "
        f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({list(HEAVY)!r}))))"))
    assert loaded == []


def test_heartbeats_are_off_whichever_is_imported_first():
    read = ("from prefect.context import GLOBAL_SETTINGS_CONTEXT as g; "
            "print(repr(g.settings.flows.heartbeat_frequency))")
    assert _python(f"import flows, prefect; {read}") == "None"  # the project's package first, Prefect later
    assert _python(f"import prefect, flows; {read}") == "None"  # Prefect already imported
    assert _python(f"import prefect; {read}") == "180"  # Prefect's own default, without this package
