"""Continual-learning metrics of the accuracy matrix (docs/design.md §5) and the run's JSON summary."""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from reporting.lifecycle.records import FUNNEL_STAGES, LifecycleMetrics


@dataclass(frozen=True)
class CLMetrics:
    """Continual-learning metrics of an accuracy matrix ``R`` of ``T`` tasks (docs/design.md §5).

    - ``final_average_accuracy`` = mean_j R[T-1][j] over all T tasks.
    - ``average_incremental_accuracy`` = mean_i (mean_{j<=i} R[i][j]): the mean accuracy on the
      seen tasks, averaged over the cycles.
    - ``forgetting_per_task[j]`` = max_{j<=i<T-1} R[i][j] - R[T-1][j] for j < T-1: the best
      accuracy task j had before the last cycle minus its final accuracy (>= 0 unless
      the last cycle improved it beyond its best, then negative). ``forgetting`` is its mean.
    - ``backward_transfer_per_task[j]`` = R[T-1][j] - R[j][j] for j < T-1: the final accuracy
      minus the accuracy right after the task was learned (negative: forgetting).
      ``backward_transfer`` is its mean.

    The last task has no earlier cycle to forget from, so it is excluded from both; with one
    task (T = 1) both are None.
    """

    final_average_accuracy: float
    average_incremental_accuracy: float
    forgetting: float | None
    backward_transfer: float | None
    forgetting_per_task: dict[int, float]
    backward_transfer_per_task: dict[int, float]

    def to_json(self) -> dict[str, Any]:
        return {
            "final_average_accuracy": self.final_average_accuracy,
            "average_incremental_accuracy": self.average_incremental_accuracy,
            "forgetting": self.forgetting,
            "backward_transfer": self.backward_transfer,
            "forgetting_per_task": {str(k): v for k, v in self.forgetting_per_task.items()},
            "backward_transfer_per_task": {str(k): v for k, v in self.backward_transfer_per_task.items()},
        }


def fsum_mean(values: Sequence[float]) -> float:
    """The mean of ``values``, summed with math.fsum."""
    return math.fsum(values) / len(values)


def continual_learning_metrics(matrix: Sequence[Sequence[float | None]], passage_tasks: Collection[int] = ()
                               ) -> CLMetrics:
    """Final average accuracy, average incremental accuracy, forgetting and backward transfer of ``R``.

    ``matrix`` is square ``(T, T)`` with numbers on and below the diagonal (entries above it
    are ignored). See :class:`CLMetrics` for the definitions. ``passage_tasks`` are periods
    that read plain passages only: they have no accuracy (their column is None) and the means
    run over the other tasks; every period stays a row.
    """
    t = len(matrix)
    if t == 0 or any(len(row) != t for row in matrix):
        raise ValueError(f"the accuracy matrix must be square and non-empty, got {[len(r) for r in matrix]} rows")
    tasks = [j for j in range(t) if j not in set(passage_tasks)]
    if not tasks:
        raise ValueError("no task with an accuracy: every period read plain passages only")
    for i, row in enumerate(matrix):
        for j in range(i + 1):
            if (row[j] is None) != (j in set(passage_tasks)):
                raise ValueError(f"accuracy_matrix[{i}][{j}] is {row[j]!r}: every labelled task seen after cycle {i} "
                                 "needs a value, and a task of passages only has none")
    r: list[dict[int, float]] = [{j: float(matrix[i][j]) for j in tasks if j <= i} for i in range(t)]  # type: ignore[arg-type]
    last = r[t - 1]
    forgetting = {j: max(r[i][j] for i in range(j, t - 1)) - last[j] for j in tasks if j < t - 1}
    bwt = {j: last[j] - r[j][j] for j in tasks if j < t - 1}
    return CLMetrics(
        final_average_accuracy=fsum_mean(list(last.values())),
        average_incremental_accuracy=fsum_mean([fsum_mean(list(row.values())) for row in r if row]),
        forgetting=fsum_mean(list(forgetting.values())) if forgetting else None,
        backward_transfer=fsum_mean(list(bwt.values())) if bwt else None,
        forgetting_per_task=forgetting,
        backward_transfer_per_task=bwt,
    )


def summarize(metrics: LifecycleMetrics) -> dict[str, Any]:
    """A JSON-serialisable summary: one row per cycle plus the continual-learning metrics."""
    cl = continual_learning_metrics(metrics.accuracy_matrix, metrics.passage_tasks)
    cycles = []
    for c in metrics.cycles:
        cycles.append({
            "cycle": c.period,
            "accuracy": {str(k): v for k, v in c.accuracy.items()},
            "mean_accuracy_seen": c.mean_accuracy_seen,
            "wake_loss_first": c.wake_loss_first,
            "wake_loss_last": c.wake_loss_last,
            "consolidations": [
                {"src": x.src, "dst": x.dst, "slot": x.slot, "retention_loss": x.retention_loss,
                 "accuracy_ratio": x.accuracy_ratio}
                for x in c.consolidations
            ],
            "dreaming": c.dreaming,
            "dream_funnel": (
                {s: c.dream_funnel.stage(s) for s in FUNNEL_STAGES} if c.dream_funnel is not None else None
            ),
            "dreams_promoted": c.dreams_promoted,
        })
    return {
        "n_tasks": metrics.n_tasks,
        "accuracy_matrix": [list(r) for r in metrics.accuracy_matrix],
        "continual_learning": cl.to_json(),
        "cycles": cycles,
    }
