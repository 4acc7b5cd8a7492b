"""The lifecycle report's task and flow: `python -m flows.report` under Prefect on the lifecycle writers' output
(the report itself: tests/reporting/test_lifecycle.py)."""

from __future__ import annotations

import json

import pytest

from tests.reporting.test_lifecycle import write_fake_run


@pytest.mark.slow
def test_cli_on_the_lifecycle_writers_output(tmp_path, prefect_harness, capsys):
    """The real summary writer of the lifecycle, then `python -m flows.report` under Prefect."""
    from flows.report import main
    from tasks.evaluate import write_accuracy_summary

    run = write_fake_run(tmp_path)
    periods = [json.loads((run / f"metrics/lifecycle/period-{p}.json").read_text()) for p in range(3)]
    (run / "metrics/lifecycle.json").unlink()
    write_accuracy_summary(run / "metrics/lifecycle.json", periods)
    (run / "params.yaml").write_text("seed: 0\n")
    assert main(["--params", str(run / "params.yaml")]) == 0
    assert "| forgetting | 0.375 |" in (run / "reports/lifecycle/report.md").read_text()
    assert "final average accuracy 0.500" in capsys.readouterr().out
    (run / "metrics/lifecycle/period-1.json").write_text("[]")
    assert main(["--params", str(run / "params.yaml")]) == 1
    assert "metrics/lifecycle/period-1.json: expected an object" in capsys.readouterr().err
