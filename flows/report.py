"""The ``report`` flow: a lifecycle run's metrics -> report.md, figures, dvc plot tables, summary table.

Run as ``python -m flows.report --params params.yaml`` after the lifecycle. Paths in the params
file are relative to the params file's directory.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from prefect import flow

from flows.args import command_parser
from flows.errors import reporting_errors
from flows.stage import tag_job_run
from model.config import load_params
from reporting import print_summary_table
from tasks.evaluate import summarise_cycles
from tasks.report import report_task


@flow(name="report", log_prints=True, on_running=[tag_job_run])
def report(params_path: str = "params.yaml") -> dict[str, Any]:
    """Write the lifecycle report and print the summary table; return the summary."""
    params_file = Path(params_path).resolve()
    params = load_params(params_file)
    summarise_cycles(params, params_file.parent)
    summary = report_task(params_file.parent, params)
    print_summary_table(summary)
    return summary


@reporting_errors("lm-sleep report")
def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; bad input is one line on stderr and exit code 1 (flows/errors.py)."""
    parser = command_parser("lm-sleep report", "Write the lifecycle report (markdown + PNG), the tables for "
                            "`dvc plots` and a summary table.")
    args = parser.parse_args(argv)
    report(args.params)
    return 0


if __name__ == "__main__":
    sys.exit(main())
