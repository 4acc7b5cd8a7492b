"""Labelled text sources and the class-incremental stream built from them.

``load_source`` reads a dataset on disk (CLINC150's JSON, or any CSV / JSON /
JSONL table) into one tidy frame of ``text``, ``label`` and ``split``.
``build_stream`` turns that frame into a seeded sequence of tasks, each with
its own disjoint set of labels and a fixed number of train and test rows per
label (docs/design.md §5). Everything here is plain pandas/numpy, so it can be tested
and reused without any orchestration or validation framework.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from model.config import DataConfig, SourceConfig
from model.errors import UserError

STREAM_FILE = "stream.parquet"
PLAN_FILE = "tasks.json"
TASKS_DIR = "tasks"  # one parquet shard per task: task-N.parquet
STREAM_COLUMNS = ["row_id", "task", "split", "text", "label"]
#: The label of a stream row that is a plain passage (text to learn, no class): the inbox's passage batches.
#: Such rows are train rows; a task's labels in the plan never include it.
PASSAGE_LABEL = ""
CLINC150_SPLITS = {"train": "train", "val": "val", "test": "test"}


class DataError(UserError, ValueError):
    """A dataset or stream request that cannot be used; the message names the file and field."""


def load_source(cfg: SourceConfig, root: Path = Path(".")) -> pd.DataFrame:
    """Read the dataset named by ``cfg`` (relative to ``root``) into columns text, label, split.

    ``split`` holds the source's split name per row, or is all missing when the
    source has none. Text is stripped; rows whose label is in
    ``cfg.exclude_labels`` are dropped. Bad input raises DataError naming the
    file, the row and the field.
    """
    path = Path(root) / cfg.path
    if not path.is_file():
        raise DataError(f"{path}: data file not found (data.source.path = {cfg.path!r})")
    if cfg.format == "clinc150":
        records, text_field, label_field, split_field = _read_clinc150(path), "text", "label", "split"
    else:
        records = read_records(path, cfg.format)
        text_field, label_field, split_field = cfg.text_field, cfg.label_field, cfg.split_field
        _check_fields(path, records, text_field, label_field, split_field)

    texts: list[str] = []
    labels: list[str] = []
    splits: list[str | None] = []
    for i, rec in enumerate(records):
        where = f"{path}: row {i}"
        text = rec.get(text_field)
        if not isinstance(text, str):
            raise DataError(f"{where}: field {text_field!r} must be a string, got {_describe(text)}")
        text = text.strip()
        if not text:
            raise DataError(f"{where}: field {text_field!r} is empty")
        if len(text) > cfg.max_text_chars:
            raise DataError(f"{where}: field {text_field!r} has {len(text)} characters, more than "
                            f"data.source.max_text_chars ({cfg.max_text_chars})")
        label = rec.get(label_field)
        if not isinstance(label, str):
            raise DataError(f"{where}: field {label_field!r} must be a string, got {_describe(label)}")
        if not label.strip():
            raise DataError(f"{where}: field {label_field!r} is empty")
        split: str | None = None
        if split_field is not None:
            split = rec.get(split_field)
            if not isinstance(split, str) or not split.strip():
                raise DataError(f"{where}: field {split_field!r} must be a non-empty string, got {_describe(split)}")
            split = split.strip()
        texts.append(text)
        labels.append(label.strip())
        splits.append(split)

    df = pd.DataFrame(
        {
            "text": pd.Series(texts, dtype="str"),
            "label": pd.Series(labels, dtype="str"),
            "split": pd.Series(splits, dtype="str" if split_field is not None else "object"),
        }
    )
    if cfg.exclude_labels:
        df = df[~df["label"].isin(cfg.exclude_labels)].reset_index(drop=True)
    return df


def _describe(value: Any) -> str:
    """Short description of a bad field value for error messages."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "a missing value"
    return f"{type(value).__name__} {value!r}"[:80]


def _read_clinc150(path: Path) -> list[dict[str, Any]]:
    """Read CLINC150's ``{split: [[text, label], ...]}`` object, keeping train/val/test."""
    obj = _read_json(path)
    if not isinstance(obj, dict):
        raise DataError(f"{path}: clinc150 format needs a JSON object of split -> rows, got {type(obj).__name__}")
    present = [k for k in CLINC150_SPLITS if k in obj]
    if not present:
        raise DataError(
            f"{path}: clinc150 format needs at least one of the keys {sorted(CLINC150_SPLITS)}; "
            f"found keys: {sorted(obj)}"
        )
    records: list[dict[str, Any]] = []
    for key in present:
        rows = obj[key]
        if not isinstance(rows, list):
            raise DataError(f"{path}: key {key!r} must be a list of [text, label] pairs, got {type(rows).__name__}")
        for j, pair in enumerate(rows):
            if not isinstance(pair, list) or len(pair) != 2:
                raise DataError(f"{path}: {key}[{j}] must be a [text, label] pair, got {_describe(pair)}")
            records.append({"text": pair[0], "label": pair[1], "split": CLINC150_SPLITS[key]})
    return records


def _read_json(path: Path) -> Any:
    """Parse a JSON file, turning parse and encoding errors into DataError."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON: {e}") from None


def read_records(path: Path, fmt: str) -> list[dict[str, Any]]:
    """Read a CSV, JSON (list of objects) or JSONL file into a list of records."""
    if fmt == "csv":
        try:
            table = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
        except pd.errors.EmptyDataError:
            raise DataError(f"{path}: CSV file is empty (no header row)") from None
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text (invalid byte 0x{e.object[e.start]:02x} at offset {e.start})") from None
        except pd.errors.ParserError as e:
            raise DataError(f"{path}: not a valid CSV file: {e}") from None
        return table.to_dict(orient="records")
    if fmt == "json":
        obj = _read_json(path)
        if not isinstance(obj, list):
            raise DataError(f"{path}: json format needs a list of objects, got {type(obj).__name__}")
        for i, rec in enumerate(obj):
            if not isinstance(rec, dict):
                raise DataError(f"{path}: row {i} must be an object, got {_describe(rec)}")
        return obj
    records: list[dict[str, Any]] = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: line {lineno} is not valid JSON: {e}") from None
                if not isinstance(rec, dict):
                    raise DataError(f"{path}: line {lineno} must be a JSON object, got {_describe(rec)}")
                records.append(rec)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8: {e}") from None
    return records


def _check_fields(
    path: Path, records: list[dict[str, Any]], text_field: str, label_field: str, split_field: str | None
) -> None:
    """Raise DataError if a configured field is absent, listing the fields that exist."""
    if not records:
        return
    available: dict[str, None] = {}
    for rec in records:
        available.update(dict.fromkeys(rec))
    for role, name in (("text_field", text_field), ("label_field", label_field), ("split_field", split_field)):
        if name is None:
            continue
        if name not in available:
            raise DataError(
                f"{path}: no field {name!r} (data.source.{role}); available fields: {', '.join(map(str, available))}"
            )
        missing = next((i for i, rec in enumerate(records) if name not in rec), None)
        if missing is not None:
            raise DataError(f"{path}: row {missing} has no field {name!r} (data.source.{role})")


def build_stream(df: pd.DataFrame, cfg: DataConfig) -> tuple[pd.DataFrame, dict[int, list[str]]]:
    """Build the seeded class-incremental stream and its plan ``{task: [labels]}``.

    Exact duplicate texts are dropped (first kept). Only labels with enough
    train and test rows are eligible; ``n_tasks * labels_per_task`` of them are
    drawn and dealt into tasks. Train rows come from the source's ``train``
    split and test rows from ``test`` (or ``val`` when there is no test split);
    without a split column each label's rows are split by the seed. Rows are
    ordered by task, then train (in the shuffled order the wake period reads)
    before test (sorted by label and text), and numbered by ``row_id``.
    """
    missing = [c for c in ("text", "label") if c not in df.columns]
    if missing:
        raise DataError(f"dataset has no column(s) {missing}; columns: {list(df.columns)}")
    if df.empty:
        raise DataError(f"dataset is empty (source {cfg.source.path}); nothing to build a stream from")

    rows_before = df["label"].value_counts()
    df = df.drop_duplicates(subset="text", keep="first").reset_index(drop=True)
    dropped = (rows_before - df["label"].value_counts()).fillna(rows_before).astype(int)
    has_split = "split" in df.columns and bool(df["split"].notna().any())
    n_train, n_test = cfg.train_per_label, cfg.test_per_label
    if has_split:
        split_names = set(df["split"].dropna().unique())
        test_name = "test" if "test" in split_names else "val"
        if "train" not in split_names or test_name not in split_names:
            raise DataError(
                f"source {cfg.source.path}: a split column needs 'train' rows and 'test' (or 'val') rows; "
                f"found splits: {sorted(split_names)}"
            )
        train_pool = _rows_by_label(df[df["split"] == "train"])
        test_pool = _rows_by_label(df[df["split"] == test_name])
        counts = {
            label: (len(train_pool.get(label, ())), len(test_pool.get(label, ())))
            for label in sorted(set(train_pool) | set(test_pool))
        }
        need = f"at least {n_train} 'train' rows and {n_test} '{test_name}' rows"
        eligible = sorted(lbl for lbl, (tr, te) in counts.items() if tr >= n_train and te >= n_test)
    else:
        test_name = ""
        pool = _rows_by_label(df)
        counts = {label: (len(idx), 0) for label, idx in pool.items()}
        need = f"at least {n_train + n_test} rows (train_per_label {n_train} + test_per_label {n_test})"
        eligible = sorted(lbl for lbl, (n, _) in counts.items() if n >= n_train + n_test)

    short = sorted(set(counts) - set(eligible))
    if short:  # never left out without a word: the user decides (more rows, or data.source.exclude_labels)
        raise DataError(
            f"{cfg.source.path}: {len(short)} of {len(counts)} labels have too few rows for a task: "
            + _describe_short(short, counts, dropped, has_split, test_name)
            + f"; a label needs {need} after dropping duplicate texts. "
            "Give them more rows or list them in data.source.exclude_labels."
        )
    n_needed = cfg.n_tasks * cfg.labels_per_task
    if n_needed > len(eligible):
        raise DataError(
            f"{cfg.source.path}: need {n_needed} labels (data.n_tasks {cfg.n_tasks} x "
            f"data.labels_per_task {cfg.labels_per_task}) but the source has {len(eligible)}. "
            "Lower n_tasks or labels_per_task."
        )

    rng = np.random.default_rng(cfg.seed)
    chosen = [eligible[i] for i in rng.choice(len(eligible), size=n_needed, replace=False)]
    plan = {
        t: sorted(chosen[t * cfg.labels_per_task : (t + 1) * cfg.labels_per_task]) for t in range(cfg.n_tasks)
    }

    parts: list[pd.DataFrame] = []
    for task, labels in plan.items():
        train_idx: list[int] = []
        test_idx: list[int] = []
        for label in labels:
            if has_split:
                train_idx.extend(rng.choice(train_pool[label], size=n_train, replace=False).tolist())
                test_idx.extend(rng.choice(test_pool[label], size=n_test, replace=False).tolist())
            else:
                picked = rng.permutation(pool[label])[: n_train + n_test].tolist()
                train_idx.extend(picked[:n_train])
                test_idx.extend(picked[n_train:])
        train = df.loc[rng.permutation(np.asarray(train_idx)), ["text", "label"]].assign(split="train")
        test = df.loc[test_idx, ["text", "label"]].sort_values(["label", "text"], kind="stable").assign(split="test")
        parts.append(pd.concat([train, test]).assign(task=task))

    stream = pd.concat(parts, ignore_index=True)
    stream.insert(0, "row_id", np.arange(len(stream), dtype="int64"))
    stream = stream.astype({"row_id": "int64", "task": "int64", "split": "str", "text": "str", "label": "str"})
    return stream[STREAM_COLUMNS], plan


def _describe_short(short: list[str], counts: dict[str, tuple[int, int]], dropped: pd.Series, has_split: bool,
                    test_name: str) -> str:
    """``rare (1 rows), copied (1 rows, 11 duplicate texts dropped), ...``: the first ten labels too short for a task."""
    shown = []
    for lbl in short[:10]:
        n_tr, n_te = counts[lbl]
        rows = f"{n_tr} train, {n_te} {test_name}" if has_split else f"{n_tr} rows"
        dup = int(dropped.get(lbl, 0))
        shown.append(f"{lbl} ({rows}" + (f", {dup} duplicate texts dropped)" if dup else ")"))
    return ", ".join(shown) + (f" and {len(short) - 10} more" if len(short) > 10 else "")


def _rows_by_label(df: pd.DataFrame) -> dict[str, np.ndarray]:
    """Positions of each label's rows, in the frame's order."""
    return {str(label): np.asarray(idx) for label, idx in df.groupby("label", sort=True).groups.items()}


def task_file(out_dir: str | Path, task: int) -> Path:
    """The shard of the stream that holds task ``task``'s rows only (what its wake and dreaming read)."""
    return Path(out_dir) / TASKS_DIR / f"task-{task}.parquet"


def load_plan(out_dir: str | Path) -> dict[int, list[str]]:
    """The task plan (task -> label names) alone: what a sleep may know of every task."""
    plan_path = Path(out_dir) / PLAN_FILE
    if not plan_path.is_file():
        raise DataError(f"{plan_path}: not found; run the prepare stage first")
    try:
        raw = json.loads(plan_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{plan_path}: not valid JSON ({e}); run the prepare stage again") from None
    if not isinstance(raw, dict) or not all(
            isinstance(k, str) and k.isdigit() and isinstance(v, list) and all(isinstance(x, str) for x in v)
            for k, v in raw.items()):
        raise DataError(f"{plan_path}: not a task plan (an object of task number -> list of label names); "
                        "run the prepare stage again")
    return {int(k): list(v) for k, v in sorted(raw.items(), key=lambda kv: int(kv[0]))}


def check_period(out_dir: str | Path, period: int, option: str = "--period") -> dict[int, list[str]]:
    """The plan, once ``period`` is known to be one of its tasks with a readable shard (else a DataError naming
    the plan file and ``option``): a stage asked for a period that does not exist stops before it starts."""
    plan = load_plan(out_dir)
    if period not in plan:
        raise DataError(f"{Path(out_dir) / PLAN_FILE}: {option} {period} is not a task of the prepared stream "
                        f"(its tasks are {min(plan)}..{max(plan)})" if plan else
                        f"{Path(out_dir) / PLAN_FILE}: the prepared stream has no tasks; run the prepare stage again")
    _read_shard(task_file(out_dir, period))
    return plan


def _read_shard(path: Path) -> pd.DataFrame:
    """A stream parquet file with the stream's columns; a missing or damaged one is a DataError naming it."""
    if not path.is_file():
        raise DataError(f"{path}: not found; run the prepare stage first")
    try:
        stream = pd.read_parquet(path)
    except Exception as e:  # pyarrow raises several kinds (ArrowInvalid, OSError) on a damaged file
        reason = str(e).splitlines()[0].rsplit("': ", 1)[-1][:120]  # without pyarrow's repeat of the path
        raise DataError(f"{path}: not a readable parquet file ({reason}); run the prepare stage again") from None
    missing = [c for c in STREAM_COLUMNS if c not in stream.columns]
    if missing:
        raise DataError(f"{path}: column(s) {missing} missing; run the prepare stage again")
    return stream


def load_stream(out_dir: str | Path, task: int | None = None) -> tuple[pd.DataFrame, dict[int, list[str]]]:
    """Read a stream and its plan written by the prepare stage (plan keys back to int).

    With ``task``, only that task's shard is read (:func:`task_file`): a stage that learns
    task t never opens the rows of any other task.
    """
    out_dir = Path(out_dir)
    stream_path, plan_path = out_dir / STREAM_FILE, out_dir / PLAN_FILE
    if task is not None:
        stream_path = task_file(out_dir, task)
    for p in (stream_path, plan_path):
        if not p.is_file():
            raise DataError(f"{p}: not found; run the prepare stage first")
    return _read_shard(stream_path), load_plan(out_dir)
