"""Open-ended periods: ingest, then `wake --inbox` / `sleep --inbox` / `cycle` consume every batch exactly once."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from model.intake import LEDGER_FILE, read_ledger
from model.data import load_stream
from tests.flows.test_lifecycle_flow import toy_project

pytestmark = pytest.mark.slow

WORDS = {"alarm": "alarm", "balance": "money", "weather": "rain", "music": "song", "timer": "clock", "joke": "funny"}


def _project(tmp_path: Path) -> Path:
    """The toy lifecycle's params with small sleeps; no prepared stream: the inbox is the only data."""
    path = toy_project(tmp_path)
    raw = yaml.safe_load(path.read_text())
    raw["wake"]["epochs"] = 2
    raw["consolidation"].update({"steps": 4, "prompt_buffer_size": 4})
    raw["lifecycle"] = {"publish": False}
    path.write_text(yaml.safe_dump(raw))
    return path


def _batch(tmp_path: Path, name: str, labels: list[str], n: int = 5) -> str:
    rows = [{"text": f"please {WORDS[lab]} {WORDS[lab]} {name} {i}", "label": lab} for lab in labels for i in range(n)]
    path = tmp_path / f"{name}.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return str(path)


def test_each_batch_is_consumed_once_in_order_and_a_crash_resumes_the_same_period(tmp_path, prefect_harness,
                                                                                     monkeypatch):
    import flows.intake as intake
    from flows.intake import cycle, ingest, wake_inbox

    params = str(_project(tmp_path))
    inbox = tmp_path / "state" / "inbox"
    a = ingest(_batch(tmp_path, "a", ["alarm", "balance"]), params)

    # A wake that dies after claiming its batches (kill -9 or an error) leaves the period claimed ...
    def crash(*args, **kwargs):
        raise RuntimeError("killed mid-wake")

    with monkeypatch.context() as m:
        m.setattr(intake, "run_wake", crash)
        with pytest.raises(RuntimeError, match="killed mid-wake"):
            wake_inbox(params)
    ledger = read_ledger(inbox / LEDGER_FILE)
    assert ledger.periods == [{"period": 0, "batches": [a["id"]], "status": "claimed"}]
    # ... and a batch that arrives meanwhile waits for the next period: the rerun takes the same batches.
    b = ingest(_batch(tmp_path, "b", ["weather", "music"]), params)
    first = cycle(params)
    assert first["wake"]["period"] == 0 and first["wake"]["batches"] == [a["id"]]
    assert set(first["sleep"]["evaluate"]["accuracy"]) == {"0"}
    c = ingest(_batch(tmp_path, "c", ["timer", "alarm"]), params)  # a label seen before comes back
    second = cycle(params)
    assert second["wake"]["batches"] == [b["id"], c["id"]]
    assert set(second["sleep"]["evaluate"]["accuracy"]) == {"0", "1"}

    ledger = read_ledger(inbox / LEDGER_FILE)
    assert [(p["period"], p["batches"], p["status"]) for p in ledger.periods] == [
        (0, [a["id"]], "done"), (1, [b["id"], c["id"]], "done")]
    stream, plan = load_stream(inbox / "stream")
    assert plan == {0: ["alarm", "balance"], 1: ["alarm", "music", "timer", "weather"]}
    assert len(stream[stream["task"] == 1]) == 20 and stream["row_id"].is_unique
    for period in (0, 1):
        assert (tmp_path / f"state/sleep/period-{period}/manifest.json").is_file()
        assert json.loads((tmp_path / f"metrics/lifecycle/period-{period}.json").read_text())["period"] == period

    # Nothing new: a no-op that changes no file of the inbox.
    before = {p: p.read_bytes() for p in inbox.rglob("*") if p.is_file() and p.name != ".lock"}
    assert cycle(params) == {"wake": None, "sleep": None}
    assert {p: p.read_bytes() for p in inbox.rglob("*") if p.is_file() and p.name != ".lock"} == before


def test_the_inbox_continues_the_prepared_stream(tmp_path, prefect_harness):
    from flows.intake import ingest, wake_inbox
    from flows.prepare import prepare

    params = str(_project(tmp_path))
    prepare(params)  # the toy stream: tasks 0 and 1
    ingest(_batch(tmp_path, "a", ["timer", "joke"]), params)
    from tasks.wake import StreamError

    with pytest.raises(StreamError, match="period-1: missing; wake period 2 starts from the sleep after period 1"):
        wake_inbox(params)  # the inbox's first period is 2: it needs the lifecycle's states first
    _, plan = load_stream(tmp_path / "state/inbox/stream")
    assert sorted(plan) == [0, 1, 2] and plan[2] == ["joke", "timer"]
