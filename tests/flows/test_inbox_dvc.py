"""DVC versions every finished inbox period (issue #15): ``pipelines/inbox/dvc.yaml`` gets a stage per period
whose deps are the batches the ledger says it consumed, and ``dvc repro`` of a stage replays that period in place,
byte for byte; ``dvc checkout`` brings back a night that retention deleted."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml

from model.data.intake import LEDGER_FILE, read_ledger
from tests.flows.test_dvc import RAN, dvc, dvc_env, make_project  # noqa: F401 (dvc_env: a fixture)
from tests.flows.test_intake_flow import _batch

pytestmark = pytest.mark.slow


def _files(root: Path, period: int) -> dict[str, str]:
    dirs = [root / f"state/{kind}/period-{period}" for kind in ("wake", "consolidated", "sleep")]
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for d in dirs for p in sorted(d.iterdir())}


def _inbox_status(root: Path, env: dict[str, str]) -> dict:
    """``dvc status`` of the inbox pipeline: stage -> what changed (the main pipeline never ran here)."""
    return json.loads(dvc(root, env, "status", "--json", "pipelines/inbox/dvc.yaml"))


def test_each_inbox_period_is_a_dvc_stage_that_replays_it_byte_for_byte(tmp_path, dvc_env, prefect_harness):
    from flows.intake import cycle, ingest

    root = make_project(tmp_path / "project")
    (root / "dvc.yaml").unlink()  # an inbox-only project: its periods start at 0, where dvc.yaml's cycles are
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["wake"]["epochs"] = 2
    raw["consolidation"].update({"steps": 4, "prompt_buffer_size": 4})
    raw["lifecycle"]["publish"] = False
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    params = str(root / "params.yaml")
    ingest(_batch(tmp_path, "a", ["alarm", "balance"]), params)
    cycle(params)  # in this process; its `dvc commit` runs in the project
    ingest(_batch(tmp_path, "b", ["weather", "music"]), params)
    cycle(params)

    ledger = read_ledger(root / "state/inbox" / LEDGER_FILE)
    pipeline = yaml.safe_load((root / "pipelines/inbox/dvc.yaml").read_text())["stages"]
    assert list(pipeline) == ["period-0", "period-1"]
    for entry in ledger.periods:  # each stage depends on exactly the batches its period consumed
        deps = pipeline[f"period-{entry['period']}"]["deps"]
        assert [d for d in deps if "/batches/" in d] == [f"state/inbox/{ledger.batch(b)['file']}" for b in entry["batches"]]
    assert "state/sleep/period-0" in pipeline["period-1"]["deps"]
    assert "state/sleep/period-1" in pipeline["period-1"]["outs"]
    lock = yaml.safe_load((root / "pipelines/inbox/dvc.lock").read_text())["stages"]
    assert set(lock) == {"period-0", "period-1"}
    assert _inbox_status(root, dvc_env) == {}  # every period committed: DVC sees it up to date
    night0, night1 = _files(root, 0), _files(root, 1)

    # A night retention deleted comes back from the DVC cache ...
    for kind in ("wake", "consolidated", "sleep"):
        shutil.rmtree(root / f"state/{kind}/period-0")
    assert "pipelines/inbox/dvc.yaml:period-0" in _inbox_status(root, dvc_env)
    dvc(root, dvc_env, "checkout", "pipelines/inbox/dvc.yaml:period-0")
    assert _files(root, 0) == night0
    # ... or is recomputed from the batches the ledger names, byte for byte (forced: not from the cache).
    before = (root / "state/inbox" / LEDGER_FILE).read_bytes()
    for kind in ("wake", "consolidated", "sleep"):
        shutil.rmtree(root / f"state/{kind}/period-1")
    out = dvc(root, dvc_env, "repro", "--force", "--single-item", "pipelines/inbox/dvc.yaml:period-1")
    assert RAN.findall(out) == ["pipelines/inbox/dvc.yaml:period-1"]
    assert _files(root, 1) == night1
    assert (root / "state/inbox" / LEDGER_FILE).read_bytes() == before  # a replay changes no ledger entry
    assert _inbox_status(root, dvc_env) == {}
