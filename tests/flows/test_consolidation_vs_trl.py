"""bench/consolidation_vs_trl.py, run as a user runs it, on the tiny model: both sides do the same work."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")  # a benchmark dependency (the `bench` extra; .ci/run installs it)
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def test_both_sides_distil_the_same_teacher_data_at_both_lambdas(tmp_path):
    """The bench's claims of like for like, which a change of params.yaml once broke unseen (two teacher samples a
    prompt crashed ours): the same teacher data D on both sides, every step timed and on- or off-policy as lambda
    says, the new expert starting at B = 0 on both (a first-step loss above zero), and #18's targets."""
    out = tmp_path / "ks.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench/consolidation_vs_trl.py"), "--source", "tiny", "--steps",
                           "1", "--warmup", "1", "--batch", "4", "--trl-variants", "trl", "--out", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    res = json.loads(out.read_text())
    assert res["targets"] == {"steps_per_second_ratio_at_least": 2.0, "peak_rss_ratio_at_most": 0.6}
    assert set(res["by_lambda"]) == {"0.0", "1.0"}
    for lmbda, entry in res["by_lambda"].items():
        vs = entry["vs_trl"]
        assert vs["same_teacher_data"] and len(entry["ours"]["teacher_data"]) == 4  # one sample per prompt
        assert entry["ours"]["on_policy_steps"] == [lmbda == "1.0"] * 2  # warm-up + timed
        for side in ("ours", "trl"):
            assert len(entry[side]["step_seconds"]) == 1 and entry[side]["steps_per_second"] > 0
            assert entry[side]["peak_rss_mib"] > 0
        assert all(math.isfinite(x) and x > 0 for x in vs["first_step_loss"].values())  # B = 0: not the teacher
