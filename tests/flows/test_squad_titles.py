"""bench/squad_titles.py: SQuAD questions as a text/label source the comparisons read like any JSONL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.squad_titles import main
from model.config.stream import SourceConfig
from model.data.stream import DataError, load_source


def _passages(path: Path) -> None:
    """Article t<i> has i + 1 passages of 3 questions; one question is blank."""
    passages = [{"title": f"Article_{i}", "context": "...",
                 "questions": [{"question": f" q{i}.{j}.{k} ", "answer": "a"} for k in range(3)]}
                for i in range(6) for j in range(i + 1)]
    passages[-1]["questions"][0]["question"] = "  "
    path.write_text(json.dumps(passages))


def test_rows_are_the_questions_of_articles_with_enough_of_them_and_load_as_a_source(tmp_path: Path) -> None:
    _passages(tmp_path / "squad.json")
    out = tmp_path / "titles.jsonl"
    assert main(["--source", str(tmp_path / "squad.json"), "--min-questions", "12", "--out", str(out)]) == 0
    df = load_source(SourceConfig(path=str(out), format="jsonl", exclude_labels=[]))
    # articles 3, 4, 5 have 12, 15, 18 questions; one of article 5's is blank
    assert df["label"].value_counts().to_dict() == {"Article 3": 12, "Article 4": 15, "Article 5": 17}
    assert df["text"].iloc[0] == "q3.0.0"  # file order, stripped
    assert main(["--source", str(tmp_path / "squad.json"), "--min-questions", "12", "--out",
                 str(tmp_path / "again.jsonl")]) == 0
    assert (tmp_path / "again.jsonl").read_bytes() == out.read_bytes()  # deterministic


def test_a_passage_without_questions_names_the_file_and_passage(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text(json.dumps([{"title": "A", "context": "..."}]))
    with pytest.raises(DataError, match=r"bad\.json: passage 0 has no field 'questions'"):
        main(["--source", str(tmp_path / "bad.json"), "--out", str(tmp_path / "x.jsonl")])
    assert not (tmp_path / "x.jsonl").exists()
