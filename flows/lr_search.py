"""The learning-rate search flow: every tunable method x every grid value on development tasks (issue #13).

``lm-sleep lr-search`` (or ``python -m flows.lr_search``) runs ``evaluation.lr_search``:
each grid value is a development comparison (``tasks/lr_search.py``) run like any other
(resumable, finished runs read back), then ``reports/lr-search/`` gets the table and the
choice per method. Nothing here edits params.yaml: the report says what to set.
"""

from __future__ import annotations

import sys
from pathlib import Path

from prefect import flow, get_run_logger

from flows.args import command_parser
from flows.compare import run_continual
from flows.errors import reporting_errors
from flows.server import command_server
from model.config import load_params
from model.data.stream import DataError
from tasks.guards import locked
from tasks.lr_search import NAME, search_comparisons, search_params, write_lr_search_report


@flow(name="lr-search", log_prints=True)
def lr_search(params_path: str = "params.yaml", quick: bool = False) -> dict:
    """Run the learning-rate search of ``params_path``; returns {report, chosen, now, rows}."""
    log = get_run_logger()
    params = search_params(load_params(params_path))
    root = Path(params_path).resolve().parent
    n_excluded, grid = search_comparisons(params, root, quick)
    work = root / params.evaluation.work_dir / NAME
    grid_results = {}
    with locked(work, "learning-rate search"):
        for lr, comp in grid:
            log.info(f"{NAME}: lr {lr:g}: {', '.join(comp.methods)} on seeds {list(comp.seeds)}")
            baselines = params.evaluation.baselines.model_copy(update={"lr": lr})
            try:
                grid_results[lr] = run_continual(params, root, comp, baselines)
            except DataError as e:
                raise DataError(f"{NAME}: the development stream (labels of no evaluation comparison) cannot be "
                                f"built: {e}") from None
        summary = write_lr_search_report(params, root, grid_results, grid[0][1].seeds, quick, n_excluded)
    log.info(f"{NAME}: chosen " + ", ".join(f"{m} {lr:g}" for m, lr in summary["chosen"].items())
             + f"; report: {summary['report']}")
    return summary


@reporting_errors("lm-sleep lr-search")
def main(argv: list[str] | None = None) -> int:
    ap = command_parser("lm-sleep lr-search", "Give every method the same learning-rate search on development "
                        "tasks (evaluation.lr_search) and write reports/lr-search/.")
    ap.add_argument("--quick", action="store_true", help="apply evaluation.quick: a small smoke run")
    args = ap.parse_args(argv)
    load_params(args.params)  # bad params: before a server starts
    with command_server("lr-search"):  # a server tethered to this command (flows/server.py), where none is set
        lr_search(args.params, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
