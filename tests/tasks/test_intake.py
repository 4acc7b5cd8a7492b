"""`lm-sleep ingest`: a file into the inbox, row checks, quarantine, the ledger, bad input (issue #15)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from model.config import load_params
from model.data.intake import LEDGER_FILE, read_ledger
from model.data.stream import DataError
from tasks.intake import inbox_dir, ingest_file


def _project(tmp_path: Path, **intake) -> tuple:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"model": {"source": "tiny"}, "intake": intake}))
    return load_params(path), tmp_path


def _csv(path: Path, rows: list[dict]) -> Path:
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def _snapshot(inbox: Path) -> dict[str, bytes]:
    return {str(p.relative_to(inbox)): p.read_bytes() for p in sorted(inbox.rglob("*")) if p.is_file()
            and p.name != ".lock"}


def test_ingest_accepts_good_rows_quarantines_bad_ones_and_is_idempotent(tmp_path, prefect_harness):
    params, root = _project(tmp_path)
    rows = [{"text": f"wake me at {i}", "label": "alarm"} for i in range(5)]
    rows += [{"text": f"play song {i}", "label": "music"} for i in range(5)]
    rows += [{"text": "a row with an empty label", "label": ""}, {"text": "   ", "label": "music"}]
    src = _csv(tmp_path / "new.csv", rows)
    record = ingest_file(params, root, str(src))
    inbox = inbox_dir(params, root)
    assert record["new"] and record["kind"] == "labelled"
    assert (record["rows"], record["accepted"], record["quarantined"]) == (12, 10, 2)
    batch = pd.read_parquet(inbox / record["file"])
    assert sorted(batch["label"].unique()) == ["alarm", "music"]
    assert (batch["split"] == "test").sum() == 2  # floor(0.2 * 5) per label, seeded by the batch's content
    quarantined = [json.loads(line) for line in (inbox / record["quarantine_file"]).read_text().splitlines()]
    assert {q["row"]: q["failed"] for q in quarantined} == {10: ["label_not_blank", "label_length"],
                                                            11: ["text_not_blank", "text_length"]}
    ledger = read_ledger(inbox / LEDGER_FILE)
    assert [b["id"] for b in ledger.batches] == [record["id"]] and ledger.periods == []

    before = _snapshot(inbox)
    again = ingest_file(params, root, str(src))
    assert not again["new"] and again["id"] == record["id"]
    assert _snapshot(inbox) == before  # the same file twice: nothing changes

    passages = tmp_path / "notes.jsonl"
    passages.write_text("\n".join(json.dumps({"text": t}) for t in ("The sky is blue.", "Water boils at 100 C.",
                                                                     "Alone.")))
    rec = ingest_file(params, root, str(passages))
    assert rec["kind"] == "passages" and rec["accepted"] == 2 and rec["quarantined"] == 1
    (bad,) = [json.loads(x) for x in (inbox / rec["quarantine_file"]).read_text().splitlines()]
    assert bad["text"] == "Alone." and bad["failed"] == ["passage_has_two_words"]  # nothing to continue
    assert len(read_ledger(inbox / LEDGER_FILE).batches) == 2


def _bad_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    out = {}
    out["missing column"] = (_csv(tmp_path / "a.csv", [{"utterance": "hi", "label": "x"}]), "no field 'text'")
    (tmp_path / "b.txt").write_text("text,label\nhi,x\n")
    out["unknown format"] = (tmp_path / "b.txt", "unknown format")
    (tmp_path / "c.csv").write_text("")
    out["empty file"] = (tmp_path / "c.csv", "empty")
    (tmp_path / "d.csv").write_bytes("text,label\nhi,x\n".encode() + b"caf\xe9,x\n")
    out["not utf-8"] = (tmp_path / "d.csv", "line 3 is not valid UTF-8")
    with open(tmp_path / "e.jsonl", "wb") as f:
        f.write(b'{"text": "ok", "label": "x"}\n{"text": "' + b"a" * (50 << 20) + b'", "label": "x"}\n')
    out["a 50 MB line"] = (tmp_path / "e.jsonl", "line 2 is longer than intake.max_line_bytes")
    out["no such file"] = (tmp_path / "nope.csv", "no such file")
    return out


@pytest.mark.parametrize("case", ["missing column", "unknown format", "empty file", "not utf-8", "a 50 MB line",
                                  "no such file"])
def test_bad_files_are_one_line_errors_naming_the_file_and_nothing_accepted_changes(tmp_path, prefect_harness, case):
    params, root = _project(tmp_path)
    good = ingest_file(params, root, str(_csv(tmp_path / "good.csv", [{"text": "hi there", "label": "greet"}] * 3)))
    inbox = inbox_dir(params, root)
    before = _snapshot(inbox)
    path, message = _bad_files(tmp_path)[case]
    with pytest.raises(DataError, match=message) as err:
        ingest_file(params, root, str(path))
    assert path.name in str(err.value) and "\n" not in str(err.value)
    assert _snapshot(inbox) == before and good["accepted"] == 3


def test_cli_reports_quarantined_rows_and_bad_files_in_one_line(tmp_path, prefect_harness, capsys):
    from flows.cli import main

    _project(tmp_path)
    params = str(tmp_path / "params.yaml")
    src = _csv(tmp_path / "x.csv", [{"text": "hi", "label": "greet"}, {"text": "bye", "label": ""}])
    assert main(["ingest", str(src), "--params", params]) == 0
    out = capsys.readouterr()
    assert "1 of 2 rows quarantined" in out.err and "1 rows accepted" in out.out
    only_bad = _csv(tmp_path / "y.csv", [{"text": "bye", "label": ""}])
    assert main(["ingest", str(only_bad), "--params", params]) == 1  # nothing accepted
    assert main(["ingest", str(tmp_path / "b.txt"), "--params", params]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("lm-sleep ingest:") and "b.txt" in err


def test_an_s3_source_is_read_and_a_missing_key_is_named(tmp_path, prefect_harness, moto_endpoint, bucket, monkeypatch):
    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_endpoint)
    params, root = _project(tmp_path)
    body = pd.DataFrame([{"text": "hello", "label": "greet"}] * 2).to_csv(index=False).encode()
    boto3.client("s3", endpoint_url=moto_endpoint).put_object(Bucket=bucket, Key="in/new.csv", Body=body)
    record = ingest_file(params, root, f"s3://{bucket}/in/new.csv")
    assert record["accepted"] == 2 and record["source"] == f"s3://{bucket}/in/new.csv"
    with pytest.raises(DataError, match="in/missing.csv: no such S3 object"):
        ingest_file(params, root, f"s3://{bucket}/in/missing.csv")


def test_a_ledger_naming_a_file_outside_the_inbox_is_refused(tmp_path, prefect_harness):
    params, root = _project(tmp_path)
    record = ingest_file(params, root, str(_csv(tmp_path / "g.csv", [{"text": "hi", "label": "greet"}])))
    path = inbox_dir(params, root) / LEDGER_FILE
    obj = json.loads(path.read_text())
    obj["batches"][0]["file"] = "../../secrets.parquet"
    path.write_text(json.dumps(obj))
    with pytest.raises(DataError, match=r"batches\[0\].file '../../secrets.parquet' lies outside the inbox"):
        read_ledger(path)
    assert record["accepted"] == 1


def test_retention_keeps_the_last_periods_and_the_pinned_ones(tmp_path):
    from model.data.intake import Ledger
    from tasks.intake import retention_plan

    periods = [{"period": p, "batches": [], "status": "done"} for p in range(3, 9)]
    ledger = Ledger([], periods + [{"period": 9, "batches": [], "status": "claimed"}])
    params, root = _project(tmp_path, keep_periods=3, pinned_periods=[4])
    assert retention_plan(params, root, ledger) == [3, 5]  # 6, 7, 8 kept; 4 pinned; 9 not finished
    params, root = _project(tmp_path, keep_periods=0)
    assert retention_plan(params, root, ledger) == []
    with pytest.raises(Exception, match="at least 2"):
        _project(tmp_path, keep_periods=1)
