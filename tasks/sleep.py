"""Prefect tasks of a sleep: consolidation of the levels that are due (docs/design.md §2)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from prefect import get_run_logger, task
from tqdm.auto import tqdm

from model.config import Params
from model.io import atomic_path
from model.memory.checkpoint import open_memory_model, read_manifest, save_state
from model.runtime import configure_torch
from model.sleep.stage import consolidate_due_levels as consolidate_levels
from tasks.caching import cache_options, remove_outputs, stamp_output, writing_outputs
from tasks.wake import TIMING, consolidated_state_dir, wake_state_dir


def _consolidation_inputs(params: Params, root: Path, period: int) -> list[Path]:
    return [wake_state_dir(params, root, period)]


@task(**cache_options(_consolidation_inputs))
def consolidate_due_levels(params: Params, root: Path, plan: dict[int, list[str]], period: int) -> dict:
    """Consolidate every level pair whose schedule fired during the wake period; save the sleep state.

    With ``consolidation.rehearsal.enabled`` the sleep first dreams inputs of every earlier
    task from their label names (``plan``: the stream's examples are not an input of a sleep) with the fast level masked,
    checks them, and distils the old model's answers on the ones that pass beside the
    period's prompts. Retention is measured apart from learning, by the evaluate stage on
    the saved states (``diagnostics``). A failure (NaN, no free slot, ...) raises before
    anything is written; one while writing removes what was written.
    """
    cfg = params.consolidation
    configure_torch(params.wake.threads, params.wake.deterministic)
    src_dir = wake_state_dir(params, root, period)
    manifest = read_manifest(src_dir)
    meta = manifest["metadata"]
    loaded, cms, optimizer = open_memory_model(params, root, src_dir, with_optimizer=True)
    done = consolidate_levels(loaded, cms, optimizer, params, plan, period, meta, manifest["step"],
                              log=get_run_logger().info,
                              progress=lambda desc, total: tqdm(total=total, desc=desc, unit="step", leave=False))
    out = consolidated_state_dir(params, root, period)
    dreams = root / cfg.dreams_dir / f"period-{period}.parquet"
    columns = ["src", "dst", "kind", "sampled_by", "step", "prompt", "text", "reference", "reward", "task", "passed",
               "failed"]
    with writing_outputs(out, dreams):
        # The wake's prompt buffer (this period's examples) stays behind: no later stage sees it. The dreamed
        # inputs (model-written, from label names) go on: the next wake's routing negatives.
        kept = {k: v for k, v in meta.items() if k not in ("prompt_buffer", "buffer_examples")}
        save_state(cms, out, optimizer, metadata={**kept, "sleep": {"period": period, "consolidations": len(done.pairs)},
                                                  "dreamed_inputs": done.dreamed_inputs})
        with atomic_path(dreams) as tmp:
            pd.DataFrame(done.samples, columns=columns).to_parquet(tmp, index=False)
    return stamp_output({"period": period, "consolidations": done.reports, "state_dir": str(out.relative_to(root)),
                         "dreams": str(dreams.relative_to(root)), TIMING: {"consolidations": done.timings}}, out)


@consolidate_due_levels.on_rollback
def _undo_consolidation(transaction) -> None:
    """A later task of the same sleep failed: remove this consolidation's files (the wake state stays)."""
    remove_outputs(transaction)
