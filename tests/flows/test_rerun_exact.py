"""bench/rerun_exact.py's inputs: which threads a rerun gets, and bad variants named."""

from __future__ import annotations

import pytest
import yaml

from bench.rerun_exact import parse_variant, with_wake
from model.config import Params


def test_with_wake_sets_only_the_named_wake_fields_of_a_dumped_params_file() -> None:
    text = yaml.safe_dump(Params().model_dump(mode="json"), sort_keys=False)
    out = yaml.safe_load(with_wake(text, {"threads": 1, "deterministic": False}))
    before = yaml.safe_load(text)
    assert (out["wake"]["threads"], out["wake"]["deterministic"]) == (1, False)
    assert (before["wake"]["threads"], before["wake"]["deterministic"]) == (2, True)
    before["wake"].update(threads=1, deterministic=False)
    assert out == before  # nothing else moved
    assert Params.model_validate(out).wake.deterministic is False  # still a valid params file


def test_with_wake_refuses_a_file_without_wake_threads() -> None:
    with pytest.raises(ValueError, match="wake.threads"):
        with_wake("seed: 0\n", {"threads": 1})


def test_parse_variant() -> None:
    assert parse_variant("as-run") == ({}, {})
    assert parse_variant("threads=2,MKL_CBWR=COMPATIBLE") == ({"threads": 2}, {"MKL_CBWR": "COMPATIBLE"})
    assert parse_variant("MKL_CBWR=AUTO") == ({}, {"MKL_CBWR": "AUTO"})
    assert parse_variant("threads=2,MKL_CBWR=AUTO,STRICT") == ({"threads": 2}, {"MKL_CBWR": "AUTO,STRICT"})
    assert parse_variant("deterministic=false,threads=1") == ({"deterministic": False, "threads": 1}, {})
    with pytest.raises(ValueError, match="not KEY=VALUE"):
        parse_variant("threads=2,STRICT")
    with pytest.raises(ValueError, match="not KEY=VALUE"):
        parse_variant("threads")
    with pytest.raises(ValueError, match="not a valid deterministic"):
        parse_variant("deterministic=maybe")
    with pytest.raises(ValueError, match="not a valid threads"):
        parse_variant("threads=two")


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
