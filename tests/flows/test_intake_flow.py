"""Open-ended periods: ingest, then `wake --inbox` / `sleep --inbox` / `cycle` consume every batch exactly once."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from model.data.intake import LEDGER_FILE, read_ledger
from model.data.stream import load_stream
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
                                                                                     monkeypatch, capsys):
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
    assert ledger.periods == [{"period": 0, "batches": [a["id"]], "status": "claimed"}]  # no state digests yet
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
    assert all(set(p["states"]) == {"wake", "consolidated", "sleep"} for p in ledger.periods)
    assert [(p["period"], p["batches"], p["status"]) for p in ledger.periods] == [
        (0, [a["id"]], "done"), (1, [b["id"], c["id"]], "done")]
    stream, plan = load_stream(inbox / "stream")
    assert plan == {0: ["alarm", "balance"], 1: ["alarm", "music", "timer", "weather"]}
    assert len(stream[stream["task"] == 1]) == 20 and stream["row_id"].is_unique
    for period in (0, 1):
        assert (tmp_path / f"state/sleep/period-{period}/manifest.json").is_file()
        assert json.loads((tmp_path / f"metrics/lifecycle/period-{period}.json").read_text())["period"] == period

    # The new state answers: predict over every label it has seen (the inbox's open stream).
    from model.serving.serving import load_state

    trained = load_state(1, params)
    assert set(trained.labels) == {"alarm", "balance", "weather", "music", "timer"}
    (top,) = trained.predict(["please clock clock now"], top_k=2)
    assert len(top) == 2 and top[0][1] >= top[1][1]

    # Any past night, rebuilt from the ledger in another directory, byte for byte.
    from flows.intake import rebuild

    out = rebuild(1, str(tmp_path / "rebuilt"), params)
    assert out["identical"] == {"wake": True, "consolidated": True, "sleep": True}
    for name in ("experts.safetensors", "manifest.json"):
        assert ((tmp_path / "rebuilt/state/sleep/period-1" / name).read_bytes()
                == (tmp_path / "state/sleep/period-1" / name).read_bytes())

    # Nothing new: a no-op that changes no file of the inbox.
    before = {p: p.read_bytes() for p in inbox.rglob("*") if p.is_file() and p.name != ".lock"}
    assert cycle(params) == {"wake": None, "sleep": None}
    assert {p: p.read_bytes() for p in inbox.rglob("*") if p.is_file() and p.name != ".lock"} == before

    # Publishing to a store that does not answer fails visibly (exit 1, one line); the uploads stay queued.
    from flows.publish import main as publish_main
    from tests.flows.helpers import free_port

    for key, value in {"LM_SLEEP_S3_BUCKET": "lm-sleep-down", "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{free_port()}",
                       "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    assert publish_main(["--params", params]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("publish incomplete:") and "stay queued" in err and "artifacts flush" in err
    assert (tmp_path / "artifacts/.outbox/pending.json").is_file()


NOTES = [
    "The harbour of Vessa freezes every winter. Its fishermen then walk to the islands on the ice and mend their nets there.",
    "Old Tamsin keeps forty goats above the village. Each goat has the name of a star and answers to a copper bell.",
]
MORE_NOTES = ["The Vessa lighthouse was built from the stones of a ruined mill. Its lamp burns seal oil and turns once a minute."]


def _notes(tmp_path: Path, name: str, texts: list[str]) -> str:
    path = tmp_path / f"{name}.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in texts) + "\n")
    return str(path)


def test_plain_passages_are_learned_a_period_of_passages_only_sleeps_and_later_sleeps_skip_it(tmp_path,
                                                                                             prefect_harness):
    from flows.intake import cycle, ingest

    params = str(_project(tmp_path))
    raw = yaml.safe_load(Path(params).read_text())
    raw["cms"]["levels"][1]["chunk_size"] = 2  # every period consolidates (each wake takes at least 2 steps)
    raw["dream"]["tau_examples"] = 6  # one dream task takes 9 labelled examples: a batch of 8 is too small to dream
    Path(params).write_text(yaml.safe_dump(raw))
    inbox = tmp_path / "state" / "inbox"
    a = ingest(_batch(tmp_path, "a", ["alarm", "balance"]), params)
    n = ingest(_notes(tmp_path, "notes", NOTES), params)

    # A period of labelled rows and passages: the wake learns both, the passages as pieces to continue.
    first = cycle(params)
    assert first["wake"]["batches"] == [a["id"], n["id"]]
    assert first["wake"]["wake"]["passage_pieces"] >= len(NOTES)
    recall = first["sleep"]["evaluate"]["passage_recall"]
    assert recall["after_sleep"]["0"] > recall["before_wake"]  # what the passages say, the slept model recalls better
    assert set(first["sleep"]["evaluate"]["accuracy"]) == {"0"}

    # A period of passages only: no labels, no test rows, no dreams; consolidation still learns the passages.
    m = ingest(_notes(tmp_path, "more", MORE_NOTES), params)
    second = cycle(params)
    assert second["wake"]["batches"] == [m["id"]]
    _, plan = load_stream(inbox / "stream")
    assert plan == {0: ["alarm", "balance"], 1: []}
    assert set(second["sleep"]["evaluate"]["accuracy"]) == {"0"}
    recall = second["sleep"]["evaluate"]["passage_recall"]
    assert set(recall["after_sleep"]) == {"0", "1"} and recall["after_sleep"]["1"] > recall["before_wake"]
    dream = json.loads((tmp_path / "metrics/dreaming/period-1.json").read_text())
    assert "plain passages only" in dream["skipped"] and "funnel" not in dream
    sleep = json.loads((tmp_path / "metrics/consolidation/period-1.json").read_text())
    assert sleep["consolidations"] and all(c["rehearsal"]["tasks"] == [0] for c in sleep["consolidations"])

    # A labelled period after it: the sleep rehearses task 0 and passes over task 1, which has no labels.
    # Its batch is too small for a dream task: the sleep goes on without dreaming and says why.
    c = ingest(_batch(tmp_path, "c", ["weather", "music"]), params)
    third = cycle(params)
    assert set(third["sleep"]["evaluate"]["accuracy"]) == {"0", "2"}
    dream = json.loads((tmp_path / "metrics/dreaming/period-2.json").read_text())
    assert "8 labelled train examples, fewer than" in dream["skipped"]
    sleep = json.loads((tmp_path / "metrics/consolidation/period-2.json").read_text())
    assert sleep["consolidations"] and all(c["rehearsal"]["tasks"] == [0] for c in sleep["consolidations"])
    ledger = read_ledger(inbox / LEDGER_FILE)
    assert [p["batches"] for p in ledger.periods] == [[a["id"], n["id"]], [m["id"]], [c["id"]]]
    assert all(p["status"] == "done" for p in ledger.periods)

    # The lifecycle report covers the period of passages: a row of the matrix, no column of its own.
    from flows.report import report

    acc = third["sleep"]["evaluate"]["accuracy"]
    summary = report(params)
    assert summary["accuracy_matrix"][2] == [acc["0"], None, acc["2"]]
    assert set(summary["continual_learning"]["forgetting_per_task"]) == {"0"}
    assert (tmp_path / "reports/lifecycle/report.md").is_file()


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


def _files(root: Path) -> dict[str, str]:
    """sha256 of every file a period leaves in the project (states, inbox, dreams, metrics; not timings or locks)."""
    import hashlib

    out = {}
    for sub in ("state", "dreams", "metrics"):
        for p in sorted((root / sub).rglob("*")):
            rel = str(p.relative_to(root))
            if p.is_file() and p.name != ".lock" and "timings" not in rel:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _killable_env(repo: Path) -> dict[str, str]:
    """The environment of a command a test kills with SIGKILL: this checkout's code, and the session's Prefect test
    server. Without a server's URL the command starts a temporary API of its own, which Prefect stops only at a
    normal exit: every kill -9 left one ``uvicorn`` running after the test suite ended."""
    import os

    from prefect.settings import PREFECT_API_URL

    return os.environ | {"PYTHONPATH": str(repo), "PREFECT_API_URL": PREFECT_API_URL.value()}


def test_kill_9_during_a_wake_then_a_rerun_ends_in_the_same_files_as_an_uninterrupted_run(tmp_path, prefect_harness):
    import os
    import signal
    import subprocess
    import sys
    import time

    from flows.intake import cycle, ingest

    repo = Path(__file__).resolve().parents[2]
    roots = {}
    for name in ("straight", "killed"):
        root = tmp_path / name
        root.mkdir()
        _project(root)
        _batch(root, "a", ["alarm", "balance"])
        roots[name] = root
    cwd = os.getcwd()
    try:  # sources named relative to each project, as a user in that directory would type them
        for root in roots.values():
            os.chdir(root)
            ingest("a.csv", "params.yaml")
        os.chdir(roots["straight"])
        cycle("params.yaml")
        os.chdir(roots["killed"])
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "cycle", "--params", "params.yaml"],
                                cwd=roots["killed"], env=_killable_env(repo), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        ledger_path = roots["killed"] / "state/inbox" / LEDGER_FILE
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if read_ledger(ledger_path).periods:  # the batches are claimed: the wake is under way
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the cycle ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert read_ledger(ledger_path).periods[0]["status"] == "claimed"
        assert not (roots["killed"] / "state/sleep/period-0").exists()
        cycle("params.yaml")  # the rerun takes up the claimed period
    finally:
        os.chdir(cwd)
    straight, killed = _files(roots["straight"]), _files(roots["killed"])
    assert straight.keys() == killed.keys()
    assert {k for k in straight if straight[k] != killed[k]} == set()


def test_kill_9_during_ingest_then_a_rerun_accepts_the_batch_once(tmp_path, prefect_harness):
    import os
    import signal
    import subprocess
    import sys
    import time

    from flows.intake import ingest

    repo = Path(__file__).resolve().parents[2]
    rows = [{"text": f"please {w} now {i}", "label": lab} for lab, w in WORDS.items() for i in range(10_000)]
    rows[7] = {"text": "an empty label", "label": ""}
    roots = {}
    for name in ("straight", "killed"):
        roots[name] = tmp_path / name
        roots[name].mkdir()
        _project(roots[name])
        pd.DataFrame(rows).to_csv(roots[name] / "big.csv", index=False)
    cwd = os.getcwd()
    try:
        os.chdir(roots["straight"])
        ingest("big.csv", "params.yaml")
        os.chdir(roots["killed"])
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "ingest", "big.csv", "--params", "params.yaml"],
                                cwd=roots["killed"], env=_killable_env(repo),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        inbox = roots["killed"] / "state/inbox"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None and not list(inbox.glob(".incoming-*")):
            time.sleep(0.01)
        time.sleep(0.3)  # inside the ingest: the file read, its rows being checked or written
        killed_mid_way = proc.poll() is None
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert killed_mid_way, "the ingest ended before it could be killed"
        assert read_ledger(inbox / LEDGER_FILE).batches == []  # nothing half-accepted
        ingest("big.csv", "params.yaml")
    finally:
        os.chdir(cwd)
    assert _files(roots["straight"]) == _files(roots["killed"])
    (batch,) = read_ledger(roots["killed"] / "state/inbox" / LEDGER_FILE).batches
    assert (batch["accepted"], batch["quarantined"]) == (len(rows) - 1, 1)
