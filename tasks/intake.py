"""Prefect tasks of the inbox (``model/data/intake.py``): ingest a file as a batch; claim the waiting batches for
an inbox period and write them into the open stream; mark how far a period got.

Layout under ``<lifecycle.state_root>/<intake.inbox>/``: ``batches/<id>.parquet`` (accepted rows, with their
split), ``quarantine/<id>.jsonl`` (rejected rows and the checks they failed), ``ledger.json`` and
``stream/`` (the open stream, in prepare's format). Every write is atomic and the ledger is written last,
under the inbox's lock, so a crash leaves either the old ledger or the new one. The finished periods' DVC
pipeline is written by ``tasks/inbox_pipeline.py``.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from checks import failing_rows
from model.config import IntakeConfig, Params
from model.data.intake import (
    LEDGER_FILE,
    Ledger,
    content_id,
    extend_stream,
    file_format,
    read_batch,
    read_ledger,
    split_batch,
)
from model.data.stream import PASSAGE_LABEL, PLAN_FILE, STREAM_COLUMNS, DataError, load_stream
from model.io import atomic_path, exclusive, sha256_file, write_json, write_text
from tasks.prepare import write_stream_files

BATCHES, QUARANTINE, STREAM = "batches", "quarantine", "stream"


def inbox_dir(params: Params, root: Path) -> Path:
    return root / params.lifecycle.state_root / params.intake.inbox


def open_stream_dir(params: Params, root: Path) -> Path:
    return inbox_dir(params, root) / STREAM


def inbox_params(params: Params, root: Path) -> Params:
    """``params`` reading the open stream: what wake, sleep and evaluate of an inbox period run with."""
    out_dir = str(open_stream_dir(params, root).relative_to(root))
    return params.model_copy(update={"data": params.data.model_copy(update={"out_dir": out_dir})})


def row_checks(cfg: IntakeConfig, kind: str) -> list[tuple[str, Any]]:
    """The Great Expectations checks of an ingested row (a failing row is quarantined, not the batch)."""
    import great_expectations as gx

    ex = gx.expectations
    checks = [
        ("text_is_a_string", ex.ExpectColumnValuesToNotBeNull(column="text")),
        ("text_not_blank", ex.ExpectColumnValuesToMatchRegex(column="text", regex=r"\S")),
        ("text_length", ex.ExpectColumnValueLengthsToBeBetween(column="text", min_value=1,
                                                               max_value=cfg.max_text_chars)),
    ]
    if kind == "labelled":
        checks += [
            ("label_is_a_string", ex.ExpectColumnValuesToNotBeNull(column="label")),
            ("label_not_blank", ex.ExpectColumnValuesToMatchRegex(column="label", regex=r"\S")),
            ("label_length", ex.ExpectColumnValueLengthsToBeBetween(column="label", min_value=1,
                                                                    max_value=cfg.max_label_chars)),
        ]
    else:  # a passage is learned by continuing it from its beginning (model.evaluation.knowledge.passage_pairs)
        checks += [("passage_has_two_words", ex.ExpectColumnValuesToMatchRegex(column="text", regex=r"\S\s+\S"))]
    return checks


def _strings(values: pd.Series) -> pd.Series:
    """Strings stripped; anything else (a number, a list, a missing value) becomes None."""
    return pd.Series([v.strip() if isinstance(v, str) else None for v in values], index=values.index, dtype="object")


def _fetch(src: str, scratch: Path) -> Path:
    """A local path for ``src``: the file itself, or an S3 object (``s3://bucket/key``) downloaded into ``scratch``."""
    if not src.startswith("s3://"):
        path = Path(src)
        if not path.is_file():
            raise DataError(f"{src}: no such file to ingest")
        return path
    import os

    from botocore.exceptions import BotoCoreError, ClientError

    from store import S3Store, StoreError

    bucket, _, key = src[len("s3://"):].partition("/")
    if not bucket or not key:
        raise DataError(f"{src}: an S3 source is s3://BUCKET/KEY")
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    try:  # any object: not one lm-sleep wrote, so no checksum metadata to verify against
        data = S3Store(bucket, prefix="", endpoint_url=endpoint).client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "")
        if code in ("NoSuchKey", "404", "NotFound", "NoSuchBucket"):
            raise DataError(f"{src}: no such S3 object ({code})") from None
        raise StoreError(f"{src}: {code or e}") from None
    except BotoCoreError as e:
        raise StoreError(f"{src}: {e}") from None
    path = scratch / Path(key).name
    path.write_bytes(data)
    return path


@task(cache_policy=NO_CACHE)
def ingest_file(params: Params, root: Path, src: str, fmt: str | None = None) -> dict[str, Any]:
    """Put one file into the inbox as a batch; return its ledger record (``new``: False when it was there).

    Whole-file problems (unknown format, empty, not UTF-8, a line too long, no text field, a missing S3 key)
    raise before anything is written. Rows failing a row check go to ``quarantine/<id>.jsonl``.
    """
    log = get_run_logger()
    cfg, inbox = params.intake, inbox_dir(params, root)
    with exclusive(inbox, "inbox"), tempfile.TemporaryDirectory(dir=inbox, prefix=".incoming-") as scratch:
        path = _fetch(src, Path(scratch))
        batch_id = content_id(path.read_bytes())
        ledger = read_ledger(inbox / LEDGER_FILE)
        known = ledger.batch(batch_id)
        if known is not None:
            log.info(f"{src}: already in the inbox as batch {batch_id[:12]}; nothing to do")
            return {**known, "new": False}
        rows, kind = read_batch(path, file_format(src, fmt), cfg.text_field, cfg.label_field, cfg.max_line_bytes)
        rows = rows.assign(text=_strings(rows["text"]), label=_strings(rows["label"]), raw_label=rows["label"],
                           raw_text=rows["text"])
        failed = failing_rows(f"intake_{kind}", rows[["row", "text", "label"]], row_checks(cfg, kind), "row")
        reasons: dict[int, list[str]] = {}
        for check, ids in failed.items():
            if None in ids:
                raise DataError(f"{src}: the row check {check!r} could not run")
            for i in ids:
                reasons.setdefault(int(i), []).append(check)
        bad = rows["row"].isin(list(reasons))
        good = rows[~bad].reset_index(drop=True)
        good = good.assign(split=split_batch(good, cfg.test_fraction, batch_id))
        if kind == "passages":
            good = good.assign(label=PASSAGE_LABEL)
        record = {"id": batch_id, "source": src, "kind": kind, "rows": int(len(rows)), "accepted": int(len(good)),
                  "quarantined": int(bad.sum()), "file": f"{BATCHES}/{batch_id}.parquet", "sha256": None,
                  "quarantine_file": f"{QUARANTINE}/{batch_id}.jsonl" if bad.any() else None}
        if len(good):
            with atomic_path(inbox / record["file"]) as tmp:
                good[["row", "text", "label", "split"]].to_parquet(tmp, index=False, engine="pyarrow")
            record["sha256"] = sha256_file(inbox / record["file"])
        if bad.any():
            lines = [json.dumps({"row": int(r.row), "text": r.raw_text, "label": r.raw_label,
                                 "failed": reasons[int(r.row)]}, default=str, ensure_ascii=False)
                     for r in rows[bad].itertuples()]
            write_text(inbox / record["quarantine_file"], "\n".join(lines) + "\n")
        ledger.batches.append(record)
        write_json(inbox / LEDGER_FILE, ledger.to_json())  # the commit point
    log.info(f"{src}: batch {batch_id[:12]} ({kind}): {record['accepted']} rows accepted, "
             f"{record['quarantined']} quarantined")
    return {**record, "new": True}


def _batch_rows(inbox: Path, record: dict[str, Any]) -> pd.DataFrame:
    """An accepted batch's rows, after checking the file against the ledger's checksum."""
    path = inbox / record["file"]
    if not path.is_file():
        raise DataError(f"{path}: batch {record['id'][:12]} of the ledger is missing")
    if sha256_file(path) != record["sha256"]:
        raise DataError(f"{path}: checksum does not match the ledger (batch {record['id'][:12]} is damaged)")
    return pd.read_parquet(path)


def _base_stream(params: Params, root: Path) -> tuple[pd.DataFrame, dict[int, list[str]]]:
    """Where the open stream starts: the prepared stream if there is one, else nothing."""
    prepared = root / params.data.out_dir
    if (prepared / PLAN_FILE).is_file():
        return load_stream(prepared)
    return pd.DataFrame({c: pd.Series(dtype="int64" if c in ("row_id", "task") else "str") for c in STREAM_COLUMNS}), {}


def _open_stream(params: Params, root: Path) -> tuple[pd.DataFrame, dict[int, list[str]]]:
    """The open stream as it is (the prepared stream before the first inbox period)."""
    out = open_stream_dir(params, root)
    return load_stream(out) if (out / PLAN_FILE).is_file() else _base_stream(params, root)


def _materialise(params: Params, root: Path, ledger: Ledger, period: dict[str, Any],
                 stream: pd.DataFrame, plan: dict[int, list[str]]) -> None:
    """Make sure the open stream holds ``period``'s task (idempotent: a crash after the claim reruns it)."""
    out = open_stream_dir(params, root)
    if period["period"] in plan:
        return
    inbox = inbox_dir(params, root)
    rows = pd.concat([_batch_rows(inbox, ledger.batch(b)) for b in period["batches"]], ignore_index=True)
    stream, plan = extend_stream(stream, plan, period["period"], rows)
    write_stream_files(stream, plan, out)


@task(cache_policy=NO_CACHE)
def claim_period(params: Params, root: Path) -> dict[str, Any] | None:
    """The inbox period to work on: the unfinished one (after a crash), else a new one claiming every waiting
    batch, labelled or passages; None when nothing waits. The claim is one atomic ledger write."""
    log = get_run_logger()
    inbox = inbox_dir(params, root)
    with exclusive(inbox, "inbox"):
        ledger = read_ledger(inbox / LEDGER_FILE)
        period = ledger.open_period()
        stream, plan = _open_stream(params, root)
        if period is None:
            waiting = ledger.waiting()
            if not waiting:
                return None
            period = {"period": max(plan) + 1 if plan else 0, "batches": [b["id"] for b in waiting],
                      "status": "claimed"}
            ledger.periods.append(period)
            write_json(inbox / LEDGER_FILE, ledger.to_json())
            log.info(f"inbox period {period['period']}: claimed {len(waiting)} batch(es)")
        _materialise(params, root, ledger, period, stream, plan)
    return period


@task(cache_policy=NO_CACHE)
def read_open_period(params: Params, root: Path) -> dict[str, Any] | None:
    """The inbox period that claimed its batches and has not finished, if any."""
    return read_ledger(inbox_dir(params, root) / LEDGER_FILE).open_period()


def last_ledger_period(params: Params, root: Path) -> dict[str, Any]:
    """The ledger's last period (its batches, records and state digests)."""
    return read_ledger(inbox_dir(params, root) / LEDGER_FILE).periods[-1]


def state_digests(params: Params, root: Path, period: int) -> dict[str, str]:
    """The digests of ``period``'s three states (the SHA-256 of each manifest, which lists its files' digests)."""
    from tasks.caching import state_digest
    from tasks.wake import consolidated_state_dir, sleep_state_dir, wake_state_dir

    return {name: state_digest(d(params, root, period)) for name, d in (
        ("wake", wake_state_dir), ("consolidated", consolidated_state_dir), ("sleep", sleep_state_dir))}


def _finished_error(params: Params, root: Path, ledger: Ledger, period: int) -> DataError:
    done = [p["period"] for p in ledger.periods if p["status"] == "done"]
    return DataError(f"{inbox_dir(params, root) / LEDGER_FILE}: no finished inbox period {period} "
                     f"(finished: {done or 'none'})")


@task(cache_policy=NO_CACHE)
def mark_period(params: Params, root: Path, period: int, status: str) -> None:
    """Record how far inbox period ``period`` got (``woken``, ``done``); when done, the digests of its three
    states (:func:`state_digests`): what a rebuild must reproduce."""
    inbox = inbox_dir(params, root)
    with exclusive(inbox, "inbox"):
        ledger = read_ledger(inbox / LEDGER_FILE)
        entry = next(p for p in ledger.periods if p["period"] == period)
        entry["status"] = status
        if status == "done":
            entry["states"] = state_digests(params, root, period)
        write_json(inbox / LEDGER_FILE, ledger.to_json())


@task(cache_policy=NO_CACHE)
def seed_rebuild(params: Params, root: Path, params_path: Path, out: Path, period: int) -> list[dict[str, Any]]:
    """Lay out ``out`` to rebuild inbox period ``period`` from the ledger: the params file, the prepared stream and
    the last prepared period's sleep state (DVC outputs), an empty inbox. Returns the ledger's periods up to
    ``period`` (each with its batch records), in order."""
    import shutil

    from tasks.wake import sleep_state_dir

    ledger = read_ledger(inbox_dir(params, root) / LEDGER_FILE)
    periods = [p for p in ledger.periods if p["period"] <= period]
    if not periods or periods[-1]["period"] != period or periods[-1]["status"] != "done":
        raise _finished_error(params, root, ledger, period)
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out}: not empty; a rebuild starts from an empty directory")
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(params_path, out / "params.yaml")
    prepared = root / params.data.out_dir
    if (prepared / PLAN_FILE).is_file():
        shutil.copytree(prepared, out / params.data.out_dir)
    first = periods[0]["period"]
    if first > 0:
        before = sleep_state_dir(params, root, first - 1)
        if not before.is_dir():
            raise DataError(f"{before}: missing; the inbox's first period starts from it (dvc repro rebuilds it)")
        shutil.copytree(before, sleep_state_dir(params, out, first - 1))
    return [{**p, "records": [ledger.batch(b) for b in p["batches"]]} for p in periods]


@task(cache_policy=NO_CACHE)
def stage_batches(params: Params, root: Path, source: Path, records: list[dict[str, Any]]) -> None:
    """Put batches (their files, checked against their digests, and their ledger records) into ``root``'s inbox,
    as the ingest that brought them did."""
    import shutil

    src, dst = inbox_dir(params, source), inbox_dir(params, root)
    with exclusive(dst, "inbox"):
        ledger = read_ledger(dst / LEDGER_FILE)
        for rec in records:
            _batch_rows(src, rec)  # the checksum
            for key in ("file", "quarantine_file"):
                if rec.get(key):
                    (dst / rec[key]).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src / rec[key], dst / rec[key])
            ledger.batches.append(rec)
        write_json(dst / LEDGER_FILE, ledger.to_json())


def period_files(params: Params, root: Path, period: int) -> list[Path]:
    """What a period leaves that retention may delete: its three states, its dreams and its dream reports.
    Metrics (small; the report reads them) and the batches (a past period is rebuilt from them) stay."""
    states = [root / d / f"period-{period}" for d in (params.wake.state_dir, params.consolidation.state_dir,
                                                       params.dream.state_dir)]
    dreams = [p for d in (params.consolidation.dreams_dir, params.dream.dreams_dir)
              for p in sorted((root / d).glob(f"period-{period}[.-]*"))]
    return [*states, *dreams, root / params.dream.reports_dir / f"period-{period}"]


def retention_plan(params: Params, root: Path, ledger: Ledger) -> list[int]:
    """Inbox periods whose files retention deletes now: finished ones older than the last ``keep_periods``
    finished, except pinned periods (never the prepared stream's: they are DVC outputs, not in the ledger)."""
    keep = params.intake.keep_periods
    if keep == 0:
        return []
    done = [p["period"] for p in ledger.periods if p["status"] == "done"]
    return [p for p in done[:-keep] if p not in set(params.intake.pinned_periods)]


@task(cache_policy=NO_CACHE)
def apply_retention(params: Params, root: Path) -> list[str]:
    """Delete the files of the periods :func:`retention_plan` names; return what was deleted (relative paths)."""
    import shutil

    inbox = inbox_dir(params, root)
    deleted = []
    with exclusive(inbox, "inbox"):
        ledger = read_ledger(inbox / LEDGER_FILE)
        for period in retention_plan(params, root, ledger):
            for path in period_files(params, root, period):
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.is_file():
                    path.unlink()
                else:
                    continue
                deleted.append(str(path.relative_to(root)))
    if deleted:
        get_run_logger().info(f"retention: deleted {len(deleted)} old paths (intake.keep_periods "
                              f"{params.intake.keep_periods})")
    return deleted


@task(cache_policy=NO_CACHE)
def finished_period(params: Params, root: Path, period: int) -> dict[str, Any]:
    """The ledger's entry of finished inbox period ``period``, whose task the open stream already holds."""
    inbox = inbox_dir(params, root)
    ledger = read_ledger(inbox / LEDGER_FILE)
    entry = next((p for p in ledger.periods if p["period"] == period), None)
    if entry is None or entry["status"] != "done":
        raise _finished_error(params, root, ledger, period)
    for b in entry["batches"]:
        _batch_rows(inbox, ledger.batch(b))  # present, and the bytes the ledger recorded
    if period not in _open_stream(params, root)[1]:
        raise DataError(f"{open_stream_dir(params, root)}: the open stream has no task {period}")
    return entry


@task(cache_policy=NO_CACHE)
def states_match(params: Params, root: Path, period: int, expected: dict[str, str]) -> dict[str, bool]:
    """Whether each state of ``period`` has the manifest digest the ledger recorded when the period finished."""
    now = state_digests(params, root, period)
    return {k: now.get(k) == v for k, v in expected.items()}
