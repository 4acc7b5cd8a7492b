"""The 30-cycle soak of issue #15 on the tiny model: memory and disk stay flat, every batch is consumed once."""

from __future__ import annotations

import pytest

from bench.soak import soak
from model.data.intake import LEDGER_FILE, read_ledger

pytestmark = pytest.mark.slow

CYCLES, KEEP = 30, 3


def test_thirty_ingest_wake_sleep_cycles_keep_memory_and_disk_flat(tmp_path, prefect_harness):
    records = soak(tmp_path, CYCLES, KEEP)
    assert [r["period"] for r in records] == list(range(CYCLES))
    rss = [r["rss_mb"] for r in records]
    assert rss[-1] < 1.10 * rss[5], rss  # the target: < 10% from cycle 5 to cycle 30
    # Retention bounds the periods' states and dreams: after the window they stop growing.
    states = [r["states_mb"] for r in records]
    assert max(states[KEEP + 2:]) <= 1.15 * min(states[KEEP + 2:]), states
    # The routing prototypes (measured apart: a centroid per label of each period, two labels a batch here) grow
    # until the slow level is full and its merges leave old periods sharing a view; a view's centroids are compacted
    # to K once they pass K (model/memory/prototypes.py), so they level off (40 cycles: 0.051-0.053 MB from cycle 12 on).
    protos = [r["prototypes_mb"] for r in records]
    assert protos[KEEP + 2] > protos[0] and max(protos[CYCLES // 2:]) <= 1.10 * min(protos[CYCLES // 2:]), protos
    for period in range(CYCLES - KEEP):
        assert not (tmp_path / f"state/sleep/period-{period}").exists()
    for period in range(CYCLES - KEEP, CYCLES):
        assert (tmp_path / f"state/sleep/period-{period}/manifest.json").is_file()
    ledger = read_ledger(tmp_path / "state/inbox" / LEDGER_FILE)
    assert [p["batches"] for p in ledger.periods] == [[b["id"]] for b in ledger.batches]  # each batch once, in order
    assert all(p["status"] == "done" for p in ledger.periods)
