"""The ``prepare`` stage: params.yaml -> validated class-incremental stream on disk.

Run as ``python -m flows.prepare --params params.yaml`` (the DVC stage command).
Paths in the params file are relative to the params file's directory.
"""

from __future__ import annotations

import sys
from pathlib import Path

from prefect import flow

from flows.args import command_parser
from flows.errors import reporting_errors
from flows.stage import tag_job_run
from model.config import load_params
from tasks.guards import check_prepare_inputs
from tasks.prepare import (
    StreamValidationError,
    build_class_stream,
    load_dataset,
    validate_class_stream,
    write_stream,
)

REPORT_DIR = Path("reports/prepare")


@flow(name="prepare", log_prints=True, on_running=[tag_job_run])
def prepare(params_path: str = "params.yaml") -> str:
    """Load the source, build and validate the stream, write it; return the stream path."""
    params_file = Path(params_path).resolve()
    root = params_file.parent
    cfg = load_params(params_file).data
    source = load_dataset(cfg.source, root)
    print(f"loaded {len(source)} rows, {source['label'].nunique()} labels from {cfg.source.path}")
    stream, plan = build_class_stream(source, cfg)
    validation = validate_class_stream(stream, plan, root / REPORT_DIR)
    print(f"validation passed: {len(validation.checks)} expectations, report in {root / REPORT_DIR}")
    path = write_stream(stream, plan, root / cfg.out_dir)
    print(f"wrote {len(stream)} rows in {len(plan)} tasks to {path}")
    return str(path)


def check_source(params_path: str) -> None:
    """The source read and the stream built (not written) before the flow starts, so bad params or data are one
    line naming the file and the field or row (a ConfigError or DataError), not a failed flow run."""
    params_file = Path(params_path).resolve()
    cfg = load_params(params_file).data
    check_prepare_inputs(cfg, params_file.parent)


@reporting_errors("lm-sleep prepare")
def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; bad input is one line on stderr and exit code 1 (flows/errors.py)."""
    parser = command_parser("lm-sleep prepare", "Build and validate the class-incremental stream.")
    args = parser.parse_args(argv)
    check_source(args.params)
    prepare(args.params)  # a StreamValidationError names the failed checks, rows and the validation report
    return 0


if __name__ == "__main__":
    sys.exit(main())
