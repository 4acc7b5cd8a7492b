"""A catalogue of bad inputs (issue #17): each is one line on stderr naming the file and the field or row, exit 1,
no traceback, and nothing lost.

Every case drives the real command line in this process (``flows.cli.main``) on a copy of one tiny project
that was prepared and ran one cycle (wake 0, sleep 0): a params file, a data file, a state, a period or a run id
goes bad, the command runs, and every file that was there before is still there with the same bytes. The
two dream cases are not command-line input: a dream is the model's own output, and the gate rejects the bad
one, naming the check, while the sleep goes on. README's "Bad input" table lists what each case prints.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from flows.cli import main
from flows.errors import DEBUG_ENV
from model.config import RUN_ID_ENV, load_params
from model.data.stream import DataError
from model.decoding.loading import tiny_model
from model.memory.checkpoint import EXPERTS_FILE, MANIFEST_FILE, TRAIN_FILE, save_state
from model.memory.cms import attach_cms
from tests.flows.test_lifecycle_flow import toy_project

REPO = Path(__file__).resolve().parents[2]
PREV = Path("state/sleep/period-0")  # what wake --period 1 starts from: the state the state cases damage
WAKE_1 = ["wake", "--period", "1"]


@pytest.fixture(scope="module")
def project(tmp_path_factory, prefect_harness) -> Path:
    """The toy project (shortened: 1 wake epoch, 2 consolidation steps, no rehearsal or dreams) after prepare and
    one real cycle: state/{wake,consolidated,sleep}/period-0 as the stages write them."""
    from flows.prepare import prepare
    from flows.sleep import sleep
    from flows.wake import wake

    root = tmp_path_factory.mktemp("bad-inputs")
    params_path = toy_project(root)
    params = yaml.safe_load(params_path.read_text())
    params["wake"]["epochs"] = 1
    params["consolidation"].update(steps=2, rehearsal={"enabled": False})
    params["dream"]["enabled"] = False
    params["lifecycle"] = {"publish": False, "diagnostics": False}
    params_path.write_text(yaml.safe_dump(params))
    prepare(str(params_path))
    wake(0, str(params_path))
    sleep(0, str(params_path))
    return root


# ----------------------------------------------------------------------------- ways to break a project


def _params(change: Callable[[dict], object]) -> Callable[[Path], None]:
    """Edit params.yaml with ``change(params)`` (a dict, changed in place)."""
    def mutate(root: Path) -> None:
        params = yaml.safe_load((root / "params.yaml").read_text())
        change(params)
        (root / "params.yaml").write_text(yaml.safe_dump(params))
    return mutate


def _level(i: int, **values) -> Callable[[dict], None]:
    return lambda p: p["cms"]["levels"][i].update(values)


def _section(section: str, **values) -> Callable[[dict], None]:
    return lambda p: p.setdefault(section, {}).update(values)


def _write(rel: str, data: bytes | str) -> Callable[[Path], None]:
    def mutate(root: Path) -> None:
        path = root / rel
        path.write_bytes(data.encode() if isinstance(data, str) else data)
    return mutate


def _rows(change: Callable[[pd.DataFrame], pd.DataFrame]) -> Callable[[Path], None]:
    """Edit the source CSV (toy.csv: 4 labels x 12 rows, columns utterance and intent)."""
    def mutate(root: Path) -> None:
        df = pd.read_csv(root / "toy.csv", dtype=str, keep_default_na=False)
        change(df).to_csv(root / "toy.csv", index=False)
    return mutate


def _jsonl_source(lines: list[str]) -> Callable[[Path], None]:
    """The source as JSON lines (a JSON value such as NaN can be written that a CSV cannot hold)."""
    def mutate(root: Path) -> None:
        df = pd.read_csv(root / "toy.csv", dtype=str, keep_default_na=False)
        body = [json.dumps(r) for r in df.to_dict(orient="records")]
        (root / "toy.jsonl").write_text("\n".join(body[:5] + lines + body[5:]) + "\n")
        _params(lambda p: p["data"]["source"].update(path="toy.jsonl", format="jsonl"))(root)
    return mutate


def _refresh_digest(state: Path, name: str) -> None:
    """Write the file's true SHA-256 into the manifest: a damage that slipped past the checksum."""
    manifest = json.loads((state / MANIFEST_FILE).read_text())
    manifest["files"][name] = hashlib.sha256((state / name).read_bytes()).hexdigest()
    (state / MANIFEST_FILE).write_text(json.dumps(manifest))


def _state(change: Callable[[Path], None], fix_digest: str | None = None) -> Callable[[Path], None]:
    def mutate(root: Path) -> None:
        change(root / PREV)
        if fix_digest:
            _refresh_digest(root / PREV, fix_digest)
    return mutate


def _truncate(state: Path) -> None:
    data = (state / EXPERTS_FILE).read_bytes()
    (state / EXPERTS_FILE).write_bytes(data[: len(data) // 2])


def _flip_byte(state: Path) -> None:
    data = bytearray((state / EXPERTS_FILE).read_bytes())
    data[len(data) // 2] ^= 0x01
    (state / EXPERTS_FILE).write_bytes(bytes(data))


def _manifest(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def mutate(state: Path) -> None:
        manifest = json.loads((state / MANIFEST_FILE).read_text())
        change(manifest)
        (state / MANIFEST_FILE).write_text(json.dumps(manifest))
    return mutate


def _reshape(state: Path) -> None:
    tensors = load_file(str(state / EXPERTS_FILE))
    tensors["blocks.2.levels.0.A.0"] = torch.zeros(64, 4)
    save_file(tensors, str(state / EXPERTS_FILE))


def _pickle(state: Path) -> None:
    (state / EXPERTS_FILE).write_bytes(pickle.dumps({"blocks.2.levels.0.A.0": [0.0] * 8}))


def _foreign_train_tensor(state: Path) -> None:
    tensors = load_file(str(state / TRAIN_FILE))
    tensors["opt/exp_avg/blocks.9.levels.0.A.0"] = torch.zeros(64, 8)
    save_file(tensors, str(state / TRAIN_FILE))


def _other_model_state(state: Path) -> None:
    """A state that a base model of another size (hidden 32, not 64) wrote, under the same model name."""
    params = load_params(state.parents[2] / "params.yaml")
    cms = attach_cms(tiny_model(hidden=32).model, params.cms, seed=0)
    shutil.rmtree(state)
    save_state(cms, state, metadata={"model": "tiny-llama", "period": 0})


def _remove(rel: str) -> Callable[[Path], None]:
    return lambda root: shutil.rmtree(root / rel)


@dataclass
class Case:
    """One bad input: how the project goes bad, the command, and what its one line must name."""

    id: str
    what: str  # the README's "case" column
    mutate: Callable[[Path], None] | None
    argv: list[str]
    names: list[str]  # the file (path or basename) and the field or row, all in the message
    env: dict[str, str] = field(default_factory=dict)


CASES = [
    # params.yaml
    Case("params-unknown-key", "params: unknown key (`cms.levels[0].topk`)", _params(_level(0, topk=2)), WAKE_1,
         ["params.yaml", "cms.levels.0.topk", "unknown key"]),
    Case("params-wrong-type", "params: wrong type (`wake.batch_size: eight`)",
         _params(_section("wake", batch_size="eight")), WAKE_1, ["params.yaml", "wake.batch_size"]),
    Case("params-out-of-range", "params: out of range (`consolidation.gamma: 1.5`)",
         _params(_section("consolidation", gamma=1.5)), WAKE_1, ["params.yaml", "consolidation.gamma"]),
    Case("params-chunks-do-not-divide", "params: chunk sizes that do not divide (fast 5, slow 12)",
         _params(_level(0, chunk_size=5)), WAKE_1, ["params.yaml", "cms", "chunk_size"]),
    Case("params-top-k-above-n-experts", "params: `top_k` above `n_experts`", _params(_level(0, top_k=4)), WAKE_1,
         ["params.yaml", "cms.levels.0", "top_k"]),
    Case("params-routing-metric-changed", "params: `cms.routing.metric` not the metric of the state's prototypes",
         _params(lambda p: p["cms"].setdefault("routing", {}).update(metric="cosine")), WAKE_1,
         ["experts.safetensors", "cms.routing.metric", "mahalanobis"]),
    Case("params-too-many-tasks", "params: more tasks than the data has labels (`data.n_tasks: 3`)",
         _params(lambda p: p["data"].update(n_tasks=3)), ["prepare"], ["toy.csv", "data.n_tasks"]),
    Case("params-cycles-do-not-match", "params: `lifecycle.cycles` not one per task",
         _params(_section("lifecycle", cycles=[{"period": 0, "after": "x"}])), WAKE_1,
         ["params.yaml", "lifecycle.cycles"]),
    Case("params-bad-run-id", "params: run id leaving the store (`lifecycle.run_id: ../x`)",
         _params(_section("lifecycle", run_id="../x")), WAKE_1, ["params.yaml", "lifecycle.run_id", "../x"]),
    Case("params-bad-max-text-chars", "params: `data.source.max_text_chars: 0`",
         _params(lambda p: p["data"]["source"].update(max_text_chars=0)), ["prepare"],
         ["params.yaml", "data.source.max_text_chars"]),
    Case("params-not-yaml", "params: not YAML", _write("params.yaml", "cms: [levels\n"), WAKE_1,
         ["params.yaml", "line 2"]),
    Case("params-missing", "params: no such file", None, ["wake", "--period", "1", "--params", "nope.yaml"],
         ["nope.yaml", "not found"]),
    # the source data (prepare)
    Case("data-empty-file", "data: empty file", _write("toy.csv", ""), ["prepare"], ["toy.csv", "empty"]),
    Case("data-missing-column", "data: missing column (`intent`)", _rows(lambda d: d.drop(columns="intent")),
         ["prepare"], ["toy.csv", "'intent'", "data.source.label_field"]),
    Case("data-not-utf8", "data: not UTF-8", _write("toy.csv", "utterance,intent\ncaf\xe9,x\n".encode("latin-1")),
         ["prepare"], ["toy.csv", "not UTF-8", "offset 3"]),
    Case("data-nan-label", "data: NaN label (JSON lines)", _jsonl_source(['{"utterance": "hi there", "intent": NaN}']),
         ["prepare"], ["toy.jsonl", "row 5", "'intent'", "missing value"]),
    Case("data-empty-label", "data: empty label", _rows(lambda d: d.assign(intent=d["intent"].mask(d.index == 7, ""))),
         ["prepare"], ["toy.csv", "row 7", "'intent' is empty"]),
    Case("data-label-with-one-example", "data: a label with one example",
         _rows(lambda d: pd.concat([d, pd.DataFrame([{"utterance": "lonely", "intent": "rare"}])])), ["prepare"],
         ["toy.csv", "rare (1 rows)", "data.source.exclude_labels"]),
    Case("data-duplicate-rows", "data: duplicate rows (a label's 12 rows one text)",
         _rows(lambda d: d.assign(utterance=d["utterance"].mask(d["intent"] == d["intent"].iloc[0], "same"))),
         ["prepare"], ["toy.csv", "11 duplicate texts dropped"]),
    Case("data-enormous-row", "data: a 5 MB row", _rows(lambda d: d.assign(utterance=d["utterance"].mask(
        d.index == 3, "x" * 5_000_000))), ["prepare"], ["toy.csv", "row 3", "'utterance'", "max_text_chars"]),
    Case("data-missing-file", "data: no such file", _params(lambda p: p["data"]["source"].update(path="gone.csv")),
         ["prepare"], ["gone.csv", "data.source.path"]),
    Case("data-plan-not-json", "stream: damaged task plan", _write("data/processed/tasks.json", "{0: "), WAKE_1,
         ["tasks.json", "not valid JSON"]),
    Case("data-shard-not-parquet", "stream: damaged shard of the period",
         _write("data/processed/tasks/task-1.parquet", b"PAR1 not really"), WAKE_1,
         ["task-1.parquet", "not a readable parquet file"]),
    # states
    Case("state-truncated", "state: truncated safetensors (digest fixed)", _state(_truncate, EXPERTS_FILE), WAKE_1,
         ["sleep/period-0/experts.safetensors", "not a readable safetensors file"]),
    Case("state-truncated-checksum", "state: truncated safetensors", _state(_truncate), WAKE_1,
         ["sleep/period-0/experts.safetensors", "checksum mismatch"]),
    Case("state-flipped-byte", "state: a flipped byte", _state(_flip_byte), WAKE_1,
         ["sleep/period-0/experts.safetensors", "checksum mismatch"]),
    Case("state-missing-expert", "state: manifest naming a missing expert (slot 9)",
         _state(_manifest(lambda m: m["levels"][0]["experts"][0].update(slot=9))), WAKE_1,
         ["sleep/period-0/manifest.json", "levels[0].experts[0].slot", "9"]),
    Case("state-wrong-shapes", "state: wrong tensor shapes (digest fixed)", _state(_reshape, EXPERTS_FILE), WAKE_1,
         ["sleep/period-0/experts.safetensors", "blocks.2.levels.0.A.0", "shape (64, 4)"]),
    Case("state-another-base-model", "state: of another base model",
         _state(_manifest(lambda m: m["metadata"].update(model="smollm2-135m-instruct-q4_1"))), WAKE_1,
         ["sleep/period-0/manifest.json", "metadata.model", "another base model"]),
    Case("state-another-model-size", "state: of a base model of another size", _state(_other_model_state), WAKE_1,
         ["sleep/period-0/manifest.json", "'layers'/'d'", "d=32"]),
    Case("state-pickle", "state: a pickle where safetensors should be (digest fixed)", _state(_pickle, EXPERTS_FILE),
         WAKE_1, ["sleep/period-0/experts.safetensors", "not a readable safetensors file"]),
    Case("state-manifest-not-json", "state: manifest not JSON", _write(f"{PREV}/{MANIFEST_FILE}", "{"), WAKE_1,
         ["sleep/period-0/manifest.json", "not valid JSON"]),
    Case("state-no-manifest", "state: no manifest", lambda root: (root / PREV / MANIFEST_FILE).unlink(), WAKE_1,
         ["sleep/period-0/manifest.json", "missing"]),
    Case("state-foreign-optimizer-tensor", "state: optimiser tensor of no parameter (digest fixed)",
         _state(_foreign_train_tensor, TRAIN_FILE), WAKE_1,
         ["sleep/period-0/train.safetensors", "opt/exp_avg/blocks.9.levels.0.A.0"]),
    Case("state-damaged-evaluate", "state: a flipped byte, read by evaluate", _state(_flip_byte),
         ["evaluate", "--period", "0"], ["sleep/period-0/experts.safetensors", "checksum mismatch"]),
    # periods
    Case("period-99", "`wake --period 99`", None, ["wake", "--period", "99"], ["tasks.json", "--period 99", "0..1"]),
    Case("period-minus-1", "`wake --period -1`", None, ["wake", "--period", "-1"], ["tasks.json", "--period -1"]),
    Case("period-before-its-sleep", "`wake --period 1` before sleep 0", _remove(str(PREV)), WAKE_1,
         ["state/sleep/period-0", "missing", "sleep after period 0"]),
    Case("sleep-before-its-wake", "`sleep --period 1` before wake 1", None, ["sleep", "--period", "1"],
         ["state/wake/period-1", "missing"]),
    Case("dream-before-consolidation", "`sleep --period 1 --stage dream` before its consolidation", None,
         ["sleep", "--period", "1", "--stage", "dream"], ["state/consolidated/period-1", "missing"]),
    Case("evaluate-before-its-sleep", "`evaluate --period 1` before sleep 1", None, ["evaluate", "--period", "1"],
         ["state/sleep/period-1", "missing"]),
    # the artifact store
    Case("store-bad-run-id-option", "store: `publish --run-id ../x`", None, ["publish", "--run-id", "../x"],
         ["--run-id", "'../x'"]),
    Case("store-run-id-env-with-slash", "store: `LM_SLEEP_RUN_ID=a/b`", None, ["publish"],
         ["params.yaml", "LM_SLEEP_RUN_ID", "'a/b'"], env={RUN_ID_ENV: "a/b"}),
    Case("store-run-id-env-at-wake", "store: `LM_SLEEP_RUN_ID=a/b`, refused before a wake trains", None, WAKE_1,
         ["params.yaml", "LM_SLEEP_RUN_ID", "'a/b'"], env={RUN_ID_ENV: "a/b"}),
    Case("store-bad-run-id-fetch", "store: `artifacts fetch ../x DEST`", None, ["artifacts", "fetch", "../x", "out"],
         ["RUN_ID", "'../x'"]),
]


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def flow_runs(monkeypatch) -> list[str]:
    """The names of the flows called while the test runs: a bad input must stop before any flow run starts."""
    from prefect.flows import Flow

    called: list[str] = []
    call = Flow.__call__

    def record(self, *args, **kwargs):
        called.append(self.name)
        return call(self, *args, **kwargs)

    monkeypatch.setattr(Flow, "__call__", record)
    return called


@pytest.fixture
def logs_to_capsys(capsys) -> Iterator[None]:
    """Point every console log handler (Prefect's included) at the captured stderr, so a flow that started and
    logged would show in what the test reads."""
    loggers = [lg for name, lg in logging.Logger.manager.loggerDict.items()
               if isinstance(lg, logging.Logger) and name.split(".")[0] == "prefect"]
    handlers = {h for lg in loggers for h in lg.handlers if isinstance(h, logging.StreamHandler)
                and type(h).__module__.startswith("prefect")}
    before = {h: h.stream for h in handlers}
    for h in handlers:
        h.stream = sys.stderr  # not setStream: that flushes the old stream, which may be closed
    yield
    for h, stream in before.items():
        h.stream = stream


def _argv(case: Case, root: Path) -> list[str]:
    argv = list(case.argv)
    if "--params" not in argv and case.argv[0] != "artifacts":
        argv += ["--params", str(root / "params.yaml")]
    return argv


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_a_bad_input_is_one_line_naming_the_file_and_field_and_loses_nothing(case: Case, project, tmp_path, capsys,
                                                                            monkeypatch, logs_to_capsys,
                                                                            flow_runs) -> None:
    root = tmp_path / "project"
    shutil.copytree(project, root)
    if case.mutate is not None:
        case.mutate(root)
    monkeypatch.chdir(root)
    monkeypatch.setenv(DEBUG_ENV, "0")  # off, and restored (unset) after the test
    for key, value in case.env.items():
        monkeypatch.setenv(key, value)
    before = _digests(root)

    code = main(_argv(case, root))
    out, err = capsys.readouterr()

    assert code == 1, err
    assert flow_runs == [], f"refused only after a flow run started: {err}"
    assert out == "" and err.endswith("\n") and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"lm-sleep {case.argv[0]}: "), err
    missing = [name for name in case.names if name not in err]
    assert not missing, f"{missing} not in: {err}"
    after = _digests(root)
    assert {p: d for p, d in after.items() if p in before} == before, "a file changed or disappeared"


def test_debug_shows_the_traceback(project, monkeypatch, capsys) -> None:
    monkeypatch.setenv(DEBUG_ENV, "0")  # off, and restored (unset) after the test
    with pytest.raises(DataError, match="--period 99 is not a task"):
        main(["--debug", "wake", "--period", "99", "--params", str(project / "params.yaml")])
    assert os.environ[DEBUG_ENV] == "1"  # what the stages a run starts inherit


def test_a_damaged_state_is_one_line_from_a_fresh_process(project, tmp_path) -> None:
    """The whole command as a user runs it: nothing that Prefect or a library prints on import or start."""
    root = tmp_path / "project"
    shutil.copytree(project, root)
    _flip_byte(root / PREV)
    env = {k: v for k, v in os.environ.items() if k != DEBUG_ENV} | {"PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "flows.cli", *WAKE_1], cwd=root, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "sleep/period-0/experts.safetensors: checksum mismatch" in proc.stderr


# ----------------------------------------------------------------------------- dreams: the model's own output


DREAM_CASES = {"dream-nan-importance": ("importance", float("nan"), "importance_finite"),
               "dream-empty-text": ("text", "", "text_not_empty")}


@pytest.mark.parametrize("case", sorted(DREAM_CASES))
def test_a_bad_dream_is_rejected_by_the_gate_naming_the_check(case: str, tmp_path) -> None:
    """A dream with a NaN importance or an empty text is not an error of the run: the gate rejects that dream,
    its report names the dream and the check, and the other dreams go on."""
    from checks import gate_dream_table
    from tests.checks.test_dreams import GATE, _table

    column, value, check = DREAM_CASES[case]
    dreams = _table()
    bad_id = dreams["dream_id"].iloc[0]  # a rewarded dream: it would have been promoted
    dreams.loc[dreams["dream_id"] == bad_id, column] = value
    gated = gate_dream_table(dreams, GATE, tmp_path)
    row = gated.set_index("dream_id").loc[bad_id]
    assert not row["gate_passed"] and row["failed_checks"] == check and not row["promoted"]
    assert gated.loc[gated["dream_id"] != bad_id, "gate_passed"].all()
    report = (tmp_path / "gate.md").read_text()
    assert bad_id in report and check in report
