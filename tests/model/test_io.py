"""Atomic writes: what a writer killed mid-write leaves is removed by the next write; the lock is one-holder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from model.io import atomic_dir, atomic_path, exclusive, remove_stale_temporaries, restore_interrupted_swap, write_text


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temporaries_of_a_killed_writer_go_with_the_next_write_and_a_live_writers_stay(tmp_path):
    dead, live = _dead_pid(), os.getppid()
    state, metrics = tmp_path / "period-0", tmp_path / "period-0.json"
    left = [tmp_path / f".period-0.{dead}.k1l2m3n4.tmp", tmp_path / f".period-0.json.{dead}.a1b2c3d4.tmp"]
    left[0].mkdir()
    (left[0] / "experts.safetensors").write_bytes(b"half")
    left[1].write_text("{")
    busy = tmp_path / f".period-0.{live}.x9y8z7w6.tmp"  # another process is writing it right now
    busy.mkdir()
    other = tmp_path / f".period-1.{dead}.q1w2e3r4.tmp"  # another destination's: left to its own next write

    with atomic_dir(state) as tmp:
        (tmp / "manifest.json").write_text("{}")
    write_text(metrics, "{}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["period-0", "period-0.json", busy.name])
    other.write_text("x")
    assert remove_stale_temporaries(tmp_path / "period-1") == [other] and not other.exists()


def test_a_failed_write_leaves_nothing_and_the_old_file_as_it_was(tmp_path):
    dest = write_text(tmp_path / "a.json", "old\n")
    with pytest.raises(RuntimeError), atomic_path(dest) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "state") as tmp:
        (tmp / "x").write_text("half")
        raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"] and dest.read_text() == "old\n"


def test_a_writer_killed_between_the_two_renames_loses_nothing(tmp_path):
    dest = tmp_path / "export"
    old = tmp_path / ".export.old"  # what kill -9 leaves after the old directory moved aside, before the new moved in
    old.mkdir()
    (old / "model.safetensors").write_text("previous")
    with pytest.raises(RuntimeError), atomic_dir(dest) as tmp:  # the next write fails too: the previous one is back
        (tmp / "model.safetensors").write_text("half")
        raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    assert (dest / "model.safetensors").read_text() == "previous"
    old.mkdir()  # a complete destination is never replaced by a leftover
    assert not restore_interrupted_swap(dest) and (dest / "model.safetensors").read_text() == "previous"
    with atomic_dir(dest) as tmp:
        (tmp / "model.safetensors").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"] and (dest / "model.safetensors").read_text() == "new"


def test_a_second_process_is_refused_the_lock_with_the_holders_pid(tmp_path):
    code = "from model.io import exclusive; import sys\nwith exclusive(sys.argv[1], 'lifecycle run'): pass"
    with exclusive(tmp_path, "lifecycle run"), exclusive(tmp_path):  # re-entrant in one process
        other = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                               cwd=Path(__file__).resolve().parents[2])
    assert other.returncode == 1
    assert f"BusyError: {tmp_path}: another lifecycle run is using this state directory (pid {os.getpid()})" \
        in other.stderr
    with exclusive(tmp_path):  # released on exit
        pass
