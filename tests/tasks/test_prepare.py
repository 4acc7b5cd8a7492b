"""The stream's Great Expectations suite, the prepare tasks and the prepare flow end to end."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import yaml

from checks import StreamValidation, StreamValidationError, validate_stream
from model.config import DataConfig, SourceConfig
from model.data.stream import DataError, build_stream, load_source, load_stream
from model.io import sha256_file
from tasks.prepare import check_and_report_stream

REPO = Path(__file__).resolve().parents[2]
CLINC = REPO / "data/raw/clinc150/data_full.json"
SMALL = {"n_tasks": 3, "labels_per_task": 4, "train_per_label": 6, "test_per_label": 3, "seed": 7}
ALL_CHECKS = {
    "schema",
    "row_id_unique",
    "text_not_null",
    "text_not_blank",
    "label_in_task",
    "split_in_set",
    "text_unique",
    "task_in_plan",
    "tasks_disjoint",
}

Plan = dict[int, list[str]]


@pytest.fixture(scope="module")
def built() -> tuple[pd.DataFrame, Plan]:
    """A real stream from the committed CLINC150 file, with small counts."""
    source = load_source(SourceConfig(path=str(CLINC), format="clinc150"))
    return build_stream(source, DataConfig(**SMALL))


def _row(stream: pd.DataFrame, task: int, split: str, nth: int = 0) -> int:
    """Index (== row_id) of the nth row of a task and split."""
    return int(stream.index[(stream["task"] == task) & (stream["split"] == split)][nth])


def _set(stream: pd.DataFrame, row: int, column: str, value: object) -> pd.DataFrame:
    bad = stream.copy()
    bad.loc[row, column] = value
    return bad


def _empty_text(s: pd.DataFrame, p: Plan) -> tuple[pd.DataFrame, Plan, list[int]]:
    r = _row(s, 1, "train", 2)
    return _set(s, r, "text", ""), p, [r]


def _whitespace_text(s: pd.DataFrame, p: Plan) -> tuple[pd.DataFrame, Plan, list[int]]:
    r = _row(s, 2, "test", 1)
    return _set(s, r, "text", " \t\n "), p, [r]


def _null_text(s: pd.DataFrame, p: Plan) -> tuple[pd.DataFrame, Plan, list[int]]:
    r = _row(s, 0, "test", 0)
    return _set(s, r, "text", None), p, [r]


def _label_outside_task(s: pd.DataFrame, p: Plan) -> tuple[pd.DataFrame, Plan, list[int]]:
    r = _row(s, 1, "test", 0)
    return _set(s, r, "label", "book_flight_to_mars"), p, [r]


def _text_in_train_and_test(s: pd.DataFrame, p: Plan) -> tuple[pd.DataFrame, Plan, list[int]]:
    train, test = _row(s, 0, "train", 0), _row(s, 2, "test", 0)
    return _set(s, test, "text", s.loc[train, "text"]), p, [train, test]


def _label_in_two_tasks(s: pd.DataFrame, p: Plan) -> tuple[pd.DataFrame, Plan, list[int]]:
    shared = p[0][0]
    plan = {t: list(labels) for t, labels in p.items()}
    plan[1].append(shared)
    r = _row(s, 1, "train", 0)
    bad = _set(s, r, "label", shared)
    return bad, plan, sorted(bad.index[bad["label"] == shared].tolist())


def _bad_split(s: pd.DataFrame, p: Plan) -> tuple[pd.DataFrame, Plan, list[int]]:
    r = _row(s, 2, "train", 3)
    return _set(s, r, "split", "dev"), p, [r]


def _non_string_text(s: pd.DataFrame, p: Plan) -> tuple[pd.DataFrame, Plan, list[int]]:
    r = _row(s, 1, "train", 0)
    bad = s.astype({"text": object})
    bad.loc[r, "text"] = 42
    return bad, p, [r]


def _float_task(s: pd.DataFrame, p: Plan) -> tuple[pd.DataFrame, Plan, list[int]]:
    return s.astype({"task": "float64"}), p, []


def _extra_column(s: pd.DataFrame, p: Plan) -> tuple[pd.DataFrame, Plan, list[int]]:
    return s.assign(source="clinc150"), p, []


def _swapped_columns(s: pd.DataFrame, p: Plan) -> tuple[pd.DataFrame, Plan, list[int]]:
    return s[["row_id", "task", "text", "split", "label"]], p, []


BAD_ROWS: list[tuple[Callable[[pd.DataFrame, Plan], tuple[pd.DataFrame, Plan, list[int]]], str]] = [
    (_empty_text, "text_not_blank"),
    (_whitespace_text, "text_not_blank"),
    (_null_text, "text_not_null"),
    (_label_outside_task, "label_in_task"),
    (_text_in_train_and_test, "text_unique"),
    (_label_in_two_tasks, "tasks_disjoint"),
    (_bad_split, "split_in_set"),
    (_non_string_text, "schema"),
    (_float_task, "schema"),
    (_extra_column, "schema"),
    (_swapped_columns, "schema"),
]


def test_suite_passes_on_a_real_stream(built: tuple[pd.DataFrame, Plan]) -> None:
    stream, plan = built
    result = validate_stream(stream, plan)
    assert result.success, result.to_markdown()
    assert {c["name"] for c in result.checks} == ALL_CHECKS
    assert all(c["success"] and c["failing_row_ids"] == [] for c in result.checks)
    json.dumps(result.to_json(), allow_nan=False)


@pytest.mark.parametrize(("corrupt", "check"), BAD_ROWS, ids=[f.__name__.strip("_") for f, _ in BAD_ROWS])
def test_each_bad_row_fails_exactly_its_check(
    built: tuple[pd.DataFrame, Plan],
    corrupt: Callable[[pd.DataFrame, Plan], tuple[pd.DataFrame, Plan, list[int]]],
    check: str,
) -> None:
    stream, plan = built
    bad, bad_plan, row_ids = corrupt(stream, plan)
    result = validate_stream(bad, bad_plan)
    assert not result.success
    assert {c["name"] for c in result.failed} == {check}, result.to_markdown()
    reported = sorted({r for c in result.failed for r in c["failing_row_ids"]})
    assert reported == row_ids
    json.dumps(result.to_json(), allow_nan=False)


def test_task_outside_plan_is_reported(built: tuple[pd.DataFrame, Plan]) -> None:
    stream, plan = built
    bad = _set(stream, 5, "task", 9)
    result = validate_stream(bad, plan)
    failed = {c["name"]: c["failing_row_ids"] for c in result.failed}
    assert failed["task_in_plan"] == [5]
    assert failed["label_in_task"] == [5]


def test_failing_row_ids_come_from_row_id_not_the_index(built: tuple[pd.DataFrame, Plan]) -> None:
    stream, plan = built
    bad = _set(stream, 4, "split", "dev").iloc[::-1].reset_index(drop=True)
    result = validate_stream(bad, plan)
    (failed,) = result.failed
    assert failed["failing_row_ids"] == [4]
    assert failed["examples"] == [{"row_id": 4, "text": stream.loc[4, "text"]}]


def test_missing_column_fails_schema_and_names_the_error(built: tuple[pd.DataFrame, Plan]) -> None:
    stream, plan = built
    result = validate_stream(stream.rename(columns={"text": "sentence"}), plan)
    names = {c["name"] for c in result.failed}
    assert "schema" in names and "text_not_null" in names
    errors = [c["error"] for c in result.failed if c["name"] == "text_not_null"]
    assert errors and 'column "text"' in errors[0]


def test_validate_task_writes_report_and_raises_with_rows_and_texts(
    built: tuple[pd.DataFrame, Plan], tmp_path: Path
) -> None:
    stream, plan = built
    bad = _set(_set(stream, 3, "text", "   "), 8, "split", "holdout")
    with pytest.raises(StreamValidationError) as err:
        check_and_report_stream(bad, plan, tmp_path / "reports")
    msg = str(err.value)
    assert "text_not_blank" in msg and "split_in_set" in msg
    assert "row_id 3: '   '" in msg
    assert f"row_id 8: {stream.loc[8, 'text']!r}" in msg
    assert str(tmp_path / "reports" / "validation.md") in msg
    report = json.loads((tmp_path / "reports" / "validation.json").read_text(encoding="utf-8"))
    assert report["success"] is False
    assert report["failed_checks"] == ["split_in_set", "text_not_blank"]
    md = (tmp_path / "reports" / "validation.md").read_text(encoding="utf-8")
    assert "**FAILED**" in md and "row_id 8" in md


def test_error_message_caps_examples_at_ten(built: tuple[pd.DataFrame, Plan]) -> None:
    stream, plan = built
    bad = stream.assign(split="dev")
    result = validate_stream(bad, plan)
    msg = str(StreamValidationError(result, "r.md"))
    assert msg.count("row_id ") == 10
    assert result.failed[0]["failing_count"] == len(stream)
    assert f"and {len(stream) - 10} more" in result.to_markdown()


def test_validation_roundtrips_to_json(built: tuple[pd.DataFrame, Plan]) -> None:
    stream, plan = built
    result = validate_stream(_set(stream, 2, "text", None), plan)
    payload = json.loads(json.dumps(result.to_json(), allow_nan=False))
    assert payload["failed_checks"] == ["text_not_null"]
    (failed,) = [c for c in payload["checks"] if not c["success"]]
    assert failed["examples"] == [{"row_id": 2, "text": None}]
    assert isinstance(result, StreamValidation)


def _project(tmp_path: Path) -> Path:
    """A throwaway project dir: params.yaml plus a copy of the CLINC150 source."""
    raw = tmp_path / "data/raw/clinc150"
    raw.mkdir(parents=True)
    shutil.copyfile(CLINC, raw / "data_full.json")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"data": SMALL}), encoding="utf-8")
    return params


def _snapshot(out_dir: Path) -> dict[str, tuple[str, int]]:
    return {str(p.relative_to(out_dir)): (sha256_file(p), p.stat().st_mtime_ns)
            for p in sorted(out_dir.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_prepare_flow_writes_stream_and_keeps_it_on_bad_source(prefect_harness: None, tmp_path: Path) -> None:
    from flows.prepare import prepare

    params = _project(tmp_path)
    out = Path(prepare(str(params)))
    out_dir = tmp_path / "data/processed"
    assert out == out_dir / "stream.parquet"
    stream, plan = load_stream(out_dir)
    expected, expected_plan = build_stream(load_source(SourceConfig(), tmp_path), DataConfig(**SMALL))
    pd.testing.assert_frame_equal(stream, expected)
    assert plan == expected_plan
    assert sorted(p.name for p in out_dir.iterdir()) == ["stream.parquet", "tasks", "tasks.json"]
    for t in plan:  # one shard per task, exactly that task's rows
        shard, _ = load_stream(out_dir, t)
        pd.testing.assert_frame_equal(shard.reset_index(drop=True),
                                      stream[stream["task"] == t].reset_index(drop=True))
    assert sorted(p.name for p in (out_dir / "tasks").iterdir()) == [f"task-{t}.parquet" for t in plan]
    report = json.loads((tmp_path / "reports/prepare/validation.json").read_text(encoding="utf-8"))
    assert report["success"] is True and report["n_failed"] == 0
    before = _snapshot(out_dir)

    source = tmp_path / "data/raw/clinc150/data_full.json"
    data = json.loads(source.read_text(encoding="utf-8"))
    data["train"][17][0] = 42
    source.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(DataError, match=r"data_full\.json: row 17: field 'text' must be a string"):
        prepare(str(params))
    source.write_text("{truncated", encoding="utf-8")
    with pytest.raises(DataError, match="not valid JSON"):
        prepare(str(params))
    assert _snapshot(out_dir) == before


@pytest.mark.slow
def test_prepare_flow_invalid_stream_writes_report_not_outputs(
    prefect_harness: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tasks.prepare
    from flows.prepare import prepare

    params = _project(tmp_path)
    prepare(str(params))
    out_dir = tmp_path / "data/processed"
    before = _snapshot(out_dir)

    def leaky_build(df: pd.DataFrame, cfg: DataConfig) -> tuple[pd.DataFrame, Plan]:
        stream, plan = build_stream(df, cfg)
        stream.loc[stream["split"] == "test", "text"] = stream.loc[0, "text"]
        return stream, plan

    monkeypatch.setattr(tasks.prepare, "build_stream", leaky_build)
    with pytest.raises(StreamValidationError) as err:
        prepare(str(params))
    assert "text_unique" in str(err.value) and "row_id 0:" in str(err.value)
    report = json.loads((tmp_path / "reports/prepare/validation.json").read_text(encoding="utf-8"))
    assert report["success"] is False and report["failed_checks"] == ["text_unique"]
    assert (tmp_path / "reports/prepare/validation.md").read_text(encoding="utf-8").startswith("# Stream validation")
    assert _snapshot(out_dir) == before


@pytest.mark.slow
def test_load_retries_os_errors_but_not_bad_data(
    prefect_harness: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tasks.prepare
    from flows.prepare import prepare

    params = _project(tmp_path)
    calls: list[str] = []
    transient = [OSError("stale file handle")]

    def flaky_load(cfg: SourceConfig, root: Path) -> pd.DataFrame:
        calls.append(cfg.path)
        if transient:
            raise transient.pop()
        return load_source(cfg, root)

    monkeypatch.setattr(tasks.prepare, "load_source", flaky_load)
    monkeypatch.setattr(tasks.prepare.load_dataset, "retry_delay_seconds", 0)
    assert Path(prepare(str(params))).is_file()
    assert len(calls) == 2

    calls.clear()
    (tmp_path / "data/raw/clinc150/data_full.json").write_text("[]", encoding="utf-8")
    with pytest.raises(DataError, match="clinc150 format needs a JSON object"):
        prepare(str(params))
    assert len(calls) == 1


@pytest.mark.slow
def test_prepare_cli_exit_codes(prefect_harness: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from flows.prepare import main

    params = _project(tmp_path)
    assert main(["--params", str(params)]) == 0
    assert (tmp_path / "data/processed/stream.parquet").is_file()
    params.write_text(yaml.safe_dump({"data": {**SMALL, "n_tasks": 40}}), encoding="utf-8")
    assert main(["--params", str(params)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lm-sleep prepare: ") and err.count("\n") == 1 and "need 160 labels" in err
