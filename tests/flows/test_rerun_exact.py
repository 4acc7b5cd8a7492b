"""bench/rerun_exact.py's inputs: which threads a rerun gets, and bad variants named."""

from __future__ import annotations

import pytest
import yaml

from bench.rerun_exact import parse_variant, with_threads
from model.config import Params


def test_with_threads_sets_only_wake_threads_of_a_dumped_params_file() -> None:
    text = yaml.safe_dump(Params().model_dump(mode="json"), sort_keys=False)
    out = yaml.safe_load(with_threads(text, 1))
    before = yaml.safe_load(text)
    assert out["wake"]["threads"] == 1 and before["wake"]["threads"] != 1
    before["wake"]["threads"] = 1
    assert out == before  # nothing else moved


def test_with_threads_refuses_a_file_without_wake_threads() -> None:
    with pytest.raises(ValueError, match="wake.threads"):
        with_threads("seed: 0\n", 1)


def test_parse_variant() -> None:
    assert parse_variant("threads=2,MKL_CBWR=COMPATIBLE") == (2, {"MKL_CBWR": "COMPATIBLE"})
    assert parse_variant("MKL_CBWR=AUTO") == (0, {"MKL_CBWR": "AUTO"})
    assert parse_variant("threads=2,MKL_CBWR=AUTO,STRICT") == (2, {"MKL_CBWR": "AUTO,STRICT"})
    with pytest.raises(ValueError, match="not KEY=VALUE"):
        parse_variant("threads=2,STRICT")
    with pytest.raises(ValueError, match="not KEY=VALUE"):
        parse_variant("threads")


@pytest.mark.parametrize(("given", "expected"), [(None, "AUTO,STRICT"), ("COMPATIBLE", "COMPATIBLE")])
def test_lm_sleep_runs_mkl_in_strict_reproducible_mode_unless_the_user_chose(given, expected) -> None:
    """flows/cli.py sets MKL_CBWR before torch (and so MKL) loads, for itself and every stage it starts; a user's own
    setting wins (docs/results/issue13/rerun-exact/)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"} | ({"MKL_CBWR": given} if given else {})
    code = "import os; import flows.cli; print(os.environ['MKL_CBWR'])"
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2], env=env,
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == expected
