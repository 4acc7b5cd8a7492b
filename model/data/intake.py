"""New data for a running model: batches, the ledger of who consumed them, and the open stream.

A *batch* is one ingested file, named by the SHA-256 of its bytes (ingesting the same file
twice is a no-op). Its rows are either labelled examples (text + label) or plain passages
(text only). The *ledger* (``ledger.json`` in the inbox) lists every batch and every inbox
period: which batches a period claimed, and how far the period got. The *open stream* is
the prepared stream's tasks followed by one task per inbox period, in the same files as
``prepare`` writes (model/data/stream.py), so wake, sleep and evaluate read it unchanged.

Exactly once: a wake first claims the unconsumed batches for its period (one atomic ledger
write); a crash after that reruns the same period with the same batches, and a batch that
arrives meanwhile waits for the next period.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from model.data.stream import PASSAGE_LABEL, STREAM_COLUMNS, DataError, read_records

FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl"}
LEDGER_FILE = "ledger.json"
LEDGER_VERSION = 1
BATCH_KINDS = ("labelled", "passages")
PERIOD_STATUS = ("claimed", "woken", "done")  # batches claimed; wake state written; sleep and evaluation done


def content_id(data: bytes) -> str:
    """The batch id: SHA-256 of the file's bytes (hex)."""
    return hashlib.sha256(data).hexdigest()


def file_format(name: str, fmt: str | None = None) -> str:
    """csv | json | jsonl: ``fmt`` if given, else from the file name's suffix."""
    if fmt is not None:
        if fmt not in set(FORMATS.values()):
            raise DataError(f"{name}: unknown format {fmt!r}; one of csv, json, jsonl")
        return fmt
    suffix = Path(name).suffix.lower()
    if suffix not in FORMATS:
        raise DataError(f"{name}: unknown format (suffix {suffix or 'none'!r}); use .csv, .json or .jsonl, or --format")
    return FORMATS[suffix]


def check_lines(path: Path, max_line_bytes: int) -> None:
    """Refuse an empty file, a line over ``max_line_bytes`` and bytes that are not UTF-8, naming the line."""
    empty = True
    with open(path, "rb") as f:
        lineno = 0
        while True:
            line = f.readline(max_line_bytes + 1)
            if not line:
                break
            lineno += 1
            if len(line) > max_line_bytes and not line.endswith(b"\n"):  # max_line_bytes + 1 without its end
                raise DataError(f"{path}: line {lineno} is longer than intake.max_line_bytes ({max_line_bytes} bytes)")
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: line {lineno} is not valid UTF-8 (byte {e.start}: {e.reason})") from None
            empty = empty and not text.strip()
    if empty:
        raise DataError(f"{path}: the file is empty; nothing to ingest")


def read_batch(path: Path, fmt: str, text_field: str, label_field: str, max_line_bytes: int) -> tuple[pd.DataFrame, str]:
    """The rows of an ingest file as columns row, text, label (label None for passages), and the batch kind.

    Whole-file problems raise DataError naming the file (and line or field); per-row problems are left to the
    row checks, which quarantine the rows.
    """
    check_lines(path, max_line_bytes)
    records = read_records(path, fmt)
    if not records:
        raise DataError(f"{path}: no rows to ingest")
    fields = sorted({k for r in records for k in r})
    if not any(text_field in r for r in records):
        raise DataError(f"{path}: no field {text_field!r} (intake.text_field); fields: {fields}")
    labelled = any(label_field in r for r in records)
    rows = pd.DataFrame({
        "row": range(len(records)),
        "text": [r.get(text_field) for r in records],
        "label": [r.get(label_field) for r in records] if labelled else [None] * len(records),
    })
    return rows, "labelled" if labelled else "passages"


def split_batch(rows: pd.DataFrame, test_fraction: float, seed: str) -> pd.Series:
    """train/test per row: ``floor(test_fraction * n)`` of each label's n rows held out (seeded by ``seed``,
    the batch id); passages (no label) are all train."""
    split = pd.Series("train", index=rows.index, dtype="str")
    if rows["label"].isna().all():
        return split
    rng = random.Random(seed)
    for label in sorted(rows["label"].dropna().unique()):
        idx = list(rows.index[rows["label"] == label])
        rng.shuffle(idx)
        split.loc[idx[: int(test_fraction * len(idx))]] = "test"
    return split


@dataclass
class Ledger:
    """Every batch of the inbox and every inbox period (what each consumed), in order."""

    batches: list[dict[str, Any]] = field(default_factory=list)
    periods: list[dict[str, Any]] = field(default_factory=list)

    def batch(self, batch_id: str) -> dict[str, Any] | None:
        return next((b for b in self.batches if b["id"] == batch_id), None)

    def consumed(self) -> set[str]:
        return {b for p in self.periods for b in p["batches"]}

    def waiting(self) -> list[dict[str, Any]]:
        """Accepted batches (labelled or passages) that no period has claimed, in arrival order."""
        used = self.consumed()
        return [b for b in self.batches if b["accepted"] > 0 and b["id"] not in used]

    def open_period(self) -> dict[str, Any] | None:
        """The period that claimed its batches and has not finished (a crash, or a sleep still to run)."""
        return next((p for p in self.periods if p["status"] != "done"), None)

    def to_json(self) -> dict[str, Any]:
        return {"version": LEDGER_VERSION, "batches": self.batches, "periods": self.periods}


def parse_ledger(obj: Any, where: str, inbox: Path) -> Ledger:
    """A Ledger from its JSON, checked: a bad field is a DataError naming ``where`` and the field; every batch
    file it names must lie inside ``inbox``."""
    if not isinstance(obj, dict) or obj.get("version") != LEDGER_VERSION:
        raise DataError(f"{where}: not a version-{LEDGER_VERSION} ledger")
    for key in ("batches", "periods"):
        if not isinstance(obj.get(key), list):
            raise DataError(f"{where}: field {key!r} must be a list")
    root = inbox.resolve()
    for i, b in enumerate(obj["batches"]):
        for key, typ in (("id", str), ("kind", str), ("file", str), ("accepted", int), ("quarantined", int)):
            if not isinstance(b.get(key), typ):
                raise DataError(f"{where}: batches[{i}].{key} must be a {typ.__name__}")
        if b["kind"] not in BATCH_KINDS:
            raise DataError(f"{where}: batches[{i}].kind must be one of {BATCH_KINDS}")
        target = (inbox / b["file"]).resolve()
        if not target.is_relative_to(root):
            raise DataError(f"{where}: batches[{i}].file {b['file']!r} lies outside the inbox {inbox}")
    ids = {b["id"] for b in obj["batches"]}
    for i, p in enumerate(obj["periods"]):
        if not isinstance(p.get("period"), int) or p.get("status") not in PERIOD_STATUS:
            raise DataError(f"{where}: periods[{i}] needs an int period and a status in {PERIOD_STATUS}")
        if not isinstance(p.get("batches"), list) or not set(p["batches"]) <= ids:
            raise DataError(f"{where}: periods[{i}].batches must list batches of the ledger")
        if not isinstance(p.get("states", {}), dict):
            raise DataError(f"{where}: periods[{i}].states must map a state to its digest")
    return Ledger(list(obj["batches"]), list(obj["periods"]))


def read_ledger(path: Path) -> Ledger:
    """The ledger at ``path`` (an empty one when the file does not exist yet)."""
    if not path.is_file():
        return Ledger()
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not valid JSON: {e}") from None
    return parse_ledger(obj, str(path), path.parent)


def extend_stream(stream: pd.DataFrame, plan: dict[int, list[str]], period: int, rows: pd.DataFrame
                  ) -> tuple[pd.DataFrame, dict[int, list[str]]]:
    """The open stream with ``rows`` (text, label, split) as task ``period``; the task's labels are those of
    its labelled rows (labels seen before may come back; a passage's label is :data:`PASSAGE_LABEL`, never in
    the plan, so a period of passages only has no labels). Rows are ordered train (in batch order) then test."""
    if period in plan:
        raise DataError(f"period {period} is already in the stream")
    if rows.empty or not (rows["split"] == "train").any():
        raise DataError(f"period {period}: no train rows")
    ordered = pd.concat([rows[rows["split"] == "train"],
                         rows[rows["split"] == "test"].sort_values(["label", "text"], kind="stable")])
    start = int(stream["row_id"].max()) + 1 if len(stream) else 0
    new = pd.DataFrame({"row_id": range(start, start + len(ordered)), "task": period,
                        "split": ordered["split"].to_numpy(), "text": ordered["text"].to_numpy(),
                        "label": ordered["label"].to_numpy()})
    out = pd.concat([stream[STREAM_COLUMNS], new[STREAM_COLUMNS]], ignore_index=True)
    out = out.astype({"row_id": "int64", "task": "int64"})
    return out, {**plan, period: sorted(set(new["label"]) - {PASSAGE_LABEL})}
