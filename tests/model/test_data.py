"""Pure tests of model.data.stream: source formats, error messages and the class-incremental stream."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from model.config import DataConfig, SourceConfig
from model.data.stream import STREAM_COLUMNS, DataError, build_stream, load_source

REPO = Path(__file__).resolve().parents[2]
CLINC = "data/raw/clinc150/data_full.json"


def _rows(n_labels: int, per_label: int) -> list[dict[str, str]]:
    """Synthetic rows: ``per_label`` distinct texts for each of ``n_labels`` labels."""
    return [
        {"utterance": f"example {i} of intent {k}", "intent": f"intent_{k}"}
        for k in range(n_labels)
        for i in range(per_label)
    ]


def _cfg(**kw: object) -> DataConfig:
    base: dict[str, object] = {"n_tasks": 2, "labels_per_task": 3, "train_per_label": 4, "test_per_label": 2}
    base.update(kw)
    return DataConfig(**base)


@pytest.fixture(scope="module")
def clinc() -> pd.DataFrame:
    return load_source(SourceConfig(path=CLINC, format="clinc150"), REPO)


def test_load_clinc150_keeps_train_val_test_and_drops_oos(clinc: pd.DataFrame) -> None:
    assert list(clinc.columns) == ["text", "label", "split"]
    assert clinc["split"].value_counts().to_dict() == {"train": 15000, "test": 4500, "val": 3000}
    assert clinc["label"].nunique() == 150
    assert "oos" not in set(clinc["label"])
    assert (clinc["text"] == clinc["text"].str.strip()).all()


def test_load_csv_json_jsonl_give_the_same_frame(tmp_path: Path) -> None:
    rows = _rows(3, 2)
    rows[0]["utterance"] = "  padded text  "
    pd.DataFrame(rows).to_csv(tmp_path / "d.csv", index=False)
    (tmp_path / "d.json").write_text(json.dumps(rows), encoding="utf-8")
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    frames = [
        load_source(SourceConfig(path=f"d.{fmt}", format=fmt, text_field="utterance", label_field="intent"), tmp_path)
        for fmt in ("csv", "json", "jsonl")
    ]
    for df in frames:
        assert list(df.columns) == ["text", "label", "split"]
        assert len(df) == 6
        assert df.loc[0, "text"] == "padded text"
        assert df["label"].tolist() == [r["intent"] for r in rows]
        assert df["split"].isna().all()
        pd.testing.assert_frame_equal(df[["text", "label"]], frames[0][["text", "label"]])


def test_load_split_field_and_exclude_labels(tmp_path: Path) -> None:
    rows = [
        {"t": "a", "y": "keep", "part": "train"},
        {"t": "b", "y": "oos", "part": "test"},
        {"t": "c", "y": "keep", "part": " test "},
    ]
    (tmp_path / "d.json").write_text(json.dumps(rows), encoding="utf-8")
    cfg = SourceConfig(path="d.json", format="json", text_field="t", label_field="y", split_field="part")
    df = load_source(cfg, tmp_path)
    assert df.to_dict("records") == [
        {"text": "a", "label": "keep", "split": "train"},
        {"text": "c", "label": "keep", "split": "test"},
    ]


@pytest.mark.parametrize("fmt", ["csv", "json", "jsonl"])
def test_missing_field_names_file_and_field_and_lists_available(tmp_path: Path, fmt: str) -> None:
    rows = _rows(2, 2)
    path = tmp_path / f"d.{fmt}"
    if fmt == "csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    elif fmt == "json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    else:
        path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_source(SourceConfig(path=path.name, format=fmt, text_field="sentence", label_field="intent"), tmp_path)
    msg = str(err.value)
    assert str(path) in msg
    assert "'sentence'" in msg and "text_field" in msg
    assert "utterance, intent" in msg


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.json: data file not found"):
        load_source(SourceConfig(path="nope.json", format="json"), tmp_path)


def test_unparseable_files_are_named(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.json: not valid JSON"):
        load_source(SourceConfig(path="bad.json", format="clinc150"), tmp_path)
    (tmp_path / "bad.jsonl").write_text('{"text": "a", "label": "x"}\n{oops\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl: line 2 is not valid JSON"):
        load_source(SourceConfig(path="bad.jsonl", format="jsonl"), tmp_path)
    (tmp_path / "empty.csv").write_text("", encoding="utf-8")
    with pytest.raises(DataError, match=r"empty\.csv: CSV file is empty"):
        load_source(SourceConfig(path="empty.csv", format="csv"), tmp_path)


@pytest.mark.parametrize(
    ("label", "expected"),
    [(3, r"row 1: field 'label' must be a string, got int 3"), ("  ", r"row 1: field 'label' is empty")],
)
def test_bad_label_names_row_and_field(tmp_path: Path, label: object, expected: str) -> None:
    rows = [{"text": "a", "label": "x"}, {"text": "b", "label": label}]
    (tmp_path / "d.json").write_text(json.dumps(rows), encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.json: " + expected):
        load_source(SourceConfig(path="d.json", format="json"), tmp_path)


def test_bad_clinc_pair_is_named(tmp_path: Path) -> None:
    (tmp_path / "c.json").write_text(json.dumps({"train": [["a", "x"], ["b"]]}), encoding="utf-8")
    with pytest.raises(DataError, match=r"c\.json: train\[1\] must be a \[text, label\] pair"):
        load_source(SourceConfig(path="c.json", format="clinc150"), tmp_path)


def test_stream_is_deterministic_and_seed_dependent(clinc: pd.DataFrame) -> None:
    a, plan_a = build_stream(clinc, _cfg(seed=3))
    b, plan_b = build_stream(clinc.copy(), _cfg(seed=3))
    pd.testing.assert_frame_equal(a, b)
    assert plan_a == plan_b
    c, plan_c = build_stream(clinc, _cfg(seed=4))
    assert plan_c != plan_a or not a.equals(c)


def test_stream_counts_columns_and_order(clinc: pd.DataFrame) -> None:
    cfg = _cfg(n_tasks=3, labels_per_task=4, train_per_label=7, test_per_label=3)
    stream, plan = build_stream(clinc, cfg)
    assert list(stream.columns) == STREAM_COLUMNS
    assert str(stream["row_id"].dtype) == "int64" and str(stream["task"].dtype) == "int64"
    assert stream["row_id"].tolist() == list(range(3 * 4 * (7 + 3)))
    assert sorted(plan) == [0, 1, 2] and all(len(v) == 4 for v in plan.values())
    counts = stream.groupby(["label", "split"]).size()
    assert set(counts.loc[(slice(None), "train")]) == {7}
    assert set(counts.loc[(slice(None), "test")]) == {3}
    order = list(zip(stream["task"], stream["split"].map({"train": 0, "test": 1}), strict=True))
    assert order == sorted(order)
    for task, labels in plan.items():
        rows = stream[stream["task"] == task]
        assert set(rows["label"]) == set(labels)
        test = rows[rows["split"] == "test"]
        assert list(zip(test["label"], test["text"], strict=True)) == sorted(zip(test["label"], test["text"]))
        train_labels = rows.loc[rows["split"] == "train", "label"].tolist()
        assert train_labels != sorted(train_labels)


def test_stream_uses_source_splits_and_tasks_are_disjoint(clinc: pd.DataFrame) -> None:
    stream, plan = build_stream(clinc, _cfg(n_tasks=4, labels_per_task=5))
    all_labels = [lbl for labels in plan.values() for lbl in labels]
    assert len(all_labels) == len(set(all_labels)) == 20
    assert (stream.groupby("label")["task"].nunique() == 1).all()
    origin = clinc.drop_duplicates("text").set_index("text")["split"]
    assert set(origin[stream.loc[stream["split"] == "train", "text"]]) == {"train"}
    assert set(origin[stream.loc[stream["split"] == "test", "text"]]) == {"test"}


def test_stream_drops_duplicates_and_has_no_train_test_overlap() -> None:
    rows = _rows(6, 6)
    dup = pd.DataFrame(rows + rows[:12])
    df = dup.rename(columns={"utterance": "text", "intent": "label"}).assign(split=None)
    stream, _ = build_stream(df, _cfg(train_per_label=4, test_per_label=2))
    assert stream["text"].is_unique
    train = set(stream.loc[stream["split"] == "train", "text"])
    test = set(stream.loc[stream["split"] == "test", "text"])
    assert len(train) == 24 and len(test) == 12 and not train & test


def test_stream_falls_back_to_val_without_test() -> None:
    rows = [
        {"text": f"{s} {i} {k}", "label": f"l{k}", "split": s}
        for k in range(2)
        for s in ("train", "val")
        for i in range(3)
    ]
    cfg = _cfg(n_tasks=1, labels_per_task=2, train_per_label=3, test_per_label=3)
    stream, _ = build_stream(pd.DataFrame(rows), cfg)
    assert stream.loc[stream["split"] == "test", "text"].str.startswith("val").all()
    assert stream.loc[stream["split"] == "train", "text"].str.startswith("train").all()


def test_too_many_tasks_says_how_many_labels_there_are(clinc: pd.DataFrame) -> None:
    with pytest.raises(DataError) as err:
        build_stream(clinc, _cfg(n_tasks=31, labels_per_task=5))
    msg = str(err.value)
    assert "need 155 labels" in msg and "n_tasks 31" in msg
    assert "the source has 150" in msg


def test_a_label_too_short_for_a_task_is_an_error_not_left_out() -> None:
    """Enough other labels do not make it silent: the user decides (more rows, or exclude_labels)."""
    rows = _rows(4, 6) + [{"utterance": "lonely", "intent": "rare"}]
    df = pd.DataFrame(rows).rename(columns={"utterance": "text", "intent": "label"})
    with pytest.raises(DataError) as err:
        build_stream(df, _cfg(n_tasks=1, labels_per_task=2, train_per_label=4, test_per_label=2))
    msg = str(err.value)
    assert "1 of 5 labels have too few rows" in msg and "exclude_labels" in msg
    assert "at least 6 rows" in msg and "rare (1 rows)" in msg
    cfg = _cfg(n_tasks=1, labels_per_task=2, train_per_label=4, test_per_label=2)
    cfg = cfg.model_copy(update={"source": cfg.source.model_copy(update={"exclude_labels": ["rare"]})})
    stream, plan = build_stream(df[df["label"] != "rare"], cfg)
    assert "rare" not in stream["label"].values


def test_a_label_of_duplicate_rows_says_how_many_were_dropped() -> None:
    rows = _rows(4, 6)
    df = pd.DataFrame(rows).rename(columns={"utterance": "text", "intent": "label"})
    first = df["label"].iloc[0]
    df.loc[df["label"] == first, "text"] = "same"
    with pytest.raises(DataError, match=re.escape(f"{first} (1 rows, 5 duplicate texts dropped)")):
        build_stream(df, _cfg(n_tasks=1, labels_per_task=2, train_per_label=4, test_per_label=2))


def test_an_enormous_row_names_the_file_row_and_limit(tmp_path: Path) -> None:
    path = tmp_path / "big.csv"
    pd.DataFrame({"text": ["short", "x" * 50], "label": ["a", "b"]}).to_csv(path, index=False)
    cfg = SourceConfig(path="big.csv", format="csv", exclude_labels=[], max_text_chars=20)
    with pytest.raises(DataError, match=re.escape("big.csv: row 1: field 'text' has 50 characters, more than "
                                                  "data.source.max_text_chars (20)")):
        load_source(cfg, tmp_path)


def test_empty_dataset_is_an_error() -> None:
    with pytest.raises(DataError, match="dataset is empty"):
        build_stream(pd.DataFrame({"text": [], "label": [], "split": []}), _cfg())
