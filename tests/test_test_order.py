"""The suite's own scheduling (tests/conftest.py): longest test files first, and the seconds per file recorded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import DURATIONS, file_weights, longest_files_first

ROOT = Path(__file__).resolve().parents[1]


def test_files_run_longest_first_each_kept_whole_and_unknown_files_last_in_collection_order():
    ids = ["t/a.py::x", "t/a.py::y", "t/b.py::x", "t/c.py::x", "t/c.py::y", "t/d.py::x", "t/e.py::x"]
    order = longest_files_first(ids, {"t/c.py": 300.0, "t/b.py": 20.0, "t/gone.py": 999.0})
    assert [ids[i] for i in order] == ["t/c.py::x", "t/c.py::y", "t/b.py::x", "t/a.py::x", "t/a.py::y", "t/d.py::x",
                                       "t/e.py::x"]
    assert longest_files_first(ids, {}) == list(range(len(ids)))


@pytest.mark.parametrize("text, says", [("{not json", "not JSON"), ("[1, 2]", "must map"),
                                        ('{"tests/x.py": -1}', "must map"), ('{"tests/x.py": "long"}', "must map")])
def test_a_bad_durations_file_is_a_usage_error_naming_it(tmp_path, text, says):
    path = tmp_path / "durations.json"
    path.write_text(text)
    with pytest.raises(pytest.UsageError, match=says) as err:
        file_weights(path)
    assert str(path) in str(err.value)
    assert file_weights(tmp_path / "absent.json") == {}


def test_the_recorded_durations_name_only_test_files_that_exist():
    weights = file_weights(DURATIONS)
    assert weights, "tests/durations.json is empty"
    assert [f for f in weights if not (ROOT / f).is_file()] == []


def test_a_run_with_two_workers_records_the_seconds_of_each_file(tmp_path):
    dest = tmp_path / "durations.json"
    env = {**os.environ, "LM_SLEEP_RECORD_DURATIONS": str(dest)}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "2", "--dist", "loadfile", "--no-loadscope-reorder",
                          "-p", "no:cacheprovider", "-k", "not two_workers", "tests/test_test_order.py"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    recorded = json.loads(dest.read_text())
    assert list(recorded) == ["tests/test_test_order.py"] and recorded["tests/test_test_order.py"] >= 0
