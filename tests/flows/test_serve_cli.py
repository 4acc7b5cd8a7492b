"""lm-sleep predict | generate | export on the states of a real (toy) lifecycle; -h and bad input."""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer, dynamic_module_utils

from flows.cli import main
from flows.lifecycle import lifecycle
from flows.prepare import prepare
from model.serving.export import verify_export
from model.serving.serving import load_state
from tests.flows.test_lifecycle_flow import toy_project

SUBCOMMANDS = {"predict": ["--labels", "--top-k", "INPUT"], "generate": ["--max-new-tokens", "--temperature", "PROMPT"],
               "export": ["--out"]}


@pytest.fixture(scope="module")
def lifecycle_root(tmp_path_factory, prefect_harness) -> Path:
    """A toy project after prepare and a 2-cycle lifecycle (shortened): real states under state/sleep/period-N."""
    root = tmp_path_factory.mktemp("served")
    params_path = toy_project(root)
    params = yaml.safe_load(params_path.read_text())
    params["wake"]["epochs"] = 4
    params["consolidation"]["steps"] = 12
    params_path.write_text(yaml.safe_dump(params))
    prepare(str(params_path))
    lifecycle(str(params_path))
    return root


def _run(argv: list[str], capsys, stdin: bytes | None = None, monkeypatch=None) -> tuple[int, str, str]:
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_each_subcommand_answers_help_with_its_own_options(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "-h"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: lm-sleep {command}" in out and "--state" in out and "--params" in out
    assert all(option in out for option in SUBCOMMANDS[command])


def test_bad_input_is_one_line_naming_the_file(tmp_path, capsys, monkeypatch):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"model": {"source": "tiny"}}))
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"txt": "no text field"}\n')
    base = ["predict", "--state", "0", "--params", str(params)]
    cases = [
        (base + [str(tmp_path / "empty.txt")], None, "empty.txt: no texts (the input is empty)"),
        (base + [str(tmp_path / "latin1.txt")], None, "latin1.txt: not UTF-8 text (invalid byte at offset 3)"),
        (base + [str(tmp_path / "missing.txt")], None, "missing.txt: cannot read: No such file or directory"),
        (base + [str(tmp_path)], None, f"{tmp_path}: cannot read: Is a directory"),
        (base + [str(tmp_path / "bad.jsonl")], None, "bad.jsonl:2: expected a JSON object with a non-empty string field 'text'"),
        (base, b"", "<stdin>: no texts (the input is empty)"),
        (base + ["-"], b"\xff\xfe", "<stdin>: not UTF-8 text"),
        (base, b"hello\n", "state/sleep/period-0: no such state directory"),
        (["generate", "--state", "0", "--params", str(params), "-"], b"", "<stdin>: no texts"),
        (["export", "--state", str(tmp_path / "nowhere"), "--params", str(params), "--out", str(tmp_path / "x")], None,
         "nowhere: no such state directory"),
        (["predict", "--state", "0", "--params", str(tmp_path / "nope.yaml")], b"hi\n", "nope.yaml: params file not found"),
    ]
    for argv, stdin, message in cases:
        code, out, err = _run(argv, capsys, stdin, monkeypatch)
        assert code == 1 and out == "", argv
        assert err.count("\n") == 1 and err.startswith(f"lm-sleep {argv[0]}: ") and message in err, err
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_predict_gives_the_evaluations_answers_with_probabilities(lifecycle_root, capsys, monkeypatch):
    stream = pd.read_parquet(lifecycle_root / "data/processed/stream.parquet")
    test = stream[stream["split"] == "test"].sort_values("row_id")  # tasks 0 and 1: every seen task's test rows
    jsonl = lifecycle_root / "test.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(test["text"])))
    params = str(lifecycle_root / "params.yaml")
    code, out, err = _run(["predict", "--state", "1", "--params", params, "--top-k", "4", str(jsonl)], capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["text"] for r in rows] == list(test["text"])
    plan = json.loads((lifecycle_root / "data/processed/tasks.json").read_text())
    for r in rows:  # every seen label, best first, probabilities summing to 1
        scores = [x["score"] for x in r["labels"]]
        assert sorted(x["label"] for x in r["labels"]) == sorted(plan["0"] + plan["1"])
        assert scores == sorted(scores, reverse=True) and sum(scores) == pytest.approx(1.0, abs=1e-5)
    # The top label is the evaluation's answer: the same accuracy per task as the cycle's metrics.
    correct = pd.Series([r["labels"][0]["label"] == g for r, g in zip(rows, test["label"])], index=test.index)
    measured = json.loads((lifecycle_root / "metrics/lifecycle/period-1.json").read_text())["accuracy"]
    assert {str(t): float(correct[test["task"] == t].mean()) for t in (0, 1)} == measured
    # Plain lines from stdin, candidate labels of one's own.
    code, out, _ = _run(["predict", "--state", str(lifecycle_root / "state/sleep/period-0"), "--params", params,
                         "--top-k", "1", "--labels", *plan["0"]], capsys, "\n".join(test["text"][:3]).encode(), monkeypatch)
    assert code == 0 and [len(json.loads(line)["labels"]) for line in out.splitlines()] == [1, 1, 1]


@pytest.mark.slow
def test_generate_and_export_round_trip(lifecycle_root, tmp_path, capsys, monkeypatch):
    params = str(lifecycle_root / "params.yaml")
    prompts = ["please alarm alarm now 1 ->", "please money money now 2 ->"]
    code, out, err = _run(["generate", "--state", "1", "--params", params, "--max-new-tokens", "5", *prompts], capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["prompt"] for r in rows] == prompts
    assert [r["text"] for r in rows] == load_state(1, params).generate(prompts, max_new_tokens=5)
    stdin = "".join(json.dumps({"prompt": p}) + "\n" for p in prompts).encode()
    code, again, _ = _run(["generate", "--state", "1", "--params", params, "--max-new-tokens", "5", "-"], capsys,
                          stdin, monkeypatch)
    assert code == 0 and again == out

    dest = tmp_path / "hf"
    code, out, err = _run(["export", "--state", "1", "--params", params, "--out", str(dest)], capsys)
    assert code == 0 and "period 1" in out, err
    assert verify_export(dest)["period"] == 1
    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "hf-modules"))
    hf = AutoModelForCausalLM.from_pretrained(dest, trust_remote_code=True)
    tok = AutoTokenizer.from_pretrained(dest, trust_remote_code=True)
    for row in rows:  # greedy text of the exported model = lm-sleep generate's
        ids = tok(row["prompt"], return_tensors="pt").input_ids
        got = hf.generate(ids, max_new_tokens=5, do_sample=False)
        assert tok.decode(got[0, ids.shape[1]:], skip_special_tokens=True) == row["text"]
    code, _, err = _run(["export", "--state", "1", "--params", params, "--out", str(lifecycle_root / "data")], capsys)
    assert code == 1 and "exists and is not an lm-sleep export" in err


@pytest.mark.slow
def test_a_corrupt_state_is_one_line_naming_the_file(lifecycle_root, tmp_path, capsys, monkeypatch):
    state = tmp_path / "state"
    shutil.copytree(lifecycle_root / "state/sleep/period-1", state)
    data = bytearray((state / "experts.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (state / "experts.safetensors").write_bytes(bytes(data))
    code, out, err = _run(["predict", "--state", str(state), "--params", str(lifecycle_root / "params.yaml")], capsys,
                          b"hello\n", monkeypatch)
    assert code == 1 and out == "" and err.count("\n") == 1
    assert "experts.safetensors: checksum mismatch" in err and "Traceback" not in err


@pytest.mark.slow
def test_kill_9_during_export_keeps_the_previous_export_and_a_rerun_writes_the_same_files(lifecycle_root, tmp_path, capsys):
    import contextlib
    import os
    import signal
    import subprocess
    import time

    from model.io import sha256_file

    params = str(lifecycle_root / "params.yaml")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert _run(["export", "--state", "1", "--params", params, "--out", str(straight)], capsys)[0] == 0
    assert _run(["export", "--state", "0", "--params", params, "--out", str(killed)], capsys)[0] == 0
    repo = Path(__file__).resolve().parents[2]
    for _ in range(5):  # the write is short: on a fast machine the export may end between the check and the kill
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "export", "--state", "1", "--params", params,
                                 "--out", str(killed)], env=os.environ | {"PYTHONPATH": str(repo)},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None and not list(tmp_path.glob(".killed.*.tmp")):
            time.sleep(0.002)
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)  # the new export is being written beside the old one
        caught = proc.wait() == -signal.SIGKILL
        if caught:
            break
        assert _run(["export", "--state", "0", "--params", params, "--out", str(killed)], capsys)[0] == 0  # again
    assert caught, "the export ended before it could be killed, 5 times"
    assert verify_export(killed)["period"] == 0  # the previous export is whole
    assert _run(["export", "--state", "1", "--params", params, "--out", str(killed)], capsys)[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["killed", "straight"]  # the killed writer's temporary is gone

    def files(d: Path) -> dict[str, str]:
        return {p.name: sha256_file(p) for p in sorted(d.iterdir())}

    assert files(killed) == files(straight) and verify_export(killed)["period"] == 1
