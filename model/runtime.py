"""The process-wide torch settings every stage starts with: its thread count, and kernels whose results do not
depend on thread timing.

A stage's outputs are meant to be a function of its code, params and inputs (dvc.yaml: a rerun from scratch
writes the same bytes). Two things in torch's CPU kernels break that besides MKL's own summation order (set by
``MKL_CBWR``, flows/cli.py):

* the thread count, which splits every parallel reduction; it is fixed here (``wake.threads``) and dynamic
  thread counts are off (``MKL_DYNAMIC``/``OMP_DYNAMIC``, flows/cli.py);
* **atomic float adds.** ``index_put_(..., accumulate=True)`` (the backward of advanced indexing such as
  ``hidden[rows, cols]``) runs in parallel with atomic adds when it writes at least 32768 floats on more than one
  thread, unless torch's deterministic algorithms are on. Where an index repeats, the adds into one element land
  in the order the threads reach them, so the gradient's last bits depend on timing. Learning to Imitate's
  :func:`model.memory.wake.grouped_logprobs` gathers a prompt's last hidden state once per continuation (its
  ``lti_group_size`` continuations are predicted from the same position), so a consolidation's gradient changed
  in the last bits from one run to the next, Adam carried that into the expert, and a make run or a comparison
  run was one draw of several (docs/results/issue13/rerun-exact/). Deterministic algorithms make that
  accumulation serial, in index order.

Deterministic mode also fills every ``torch.empty`` with NaN by default (to expose reads of uninitialised
memory); nothing here reads memory it did not write, so that fill, a cost on every allocation, stays off.
"""

from __future__ import annotations

import torch


def configure_torch(threads: int, deterministic: bool = True) -> None:
    """Set this process's torch threads and (``deterministic``) torch's deterministic algorithms.

    ``warn_only``: an op with no deterministic implementation (none on the CPU paths here; a few CUDA kernels)
    warns instead of stopping the stage.
    """
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False


__all__ = ["configure_torch"]
