"""What a lifecycle run left behind, as the report reads it: where the report goes, the records of
one run (cycles, consolidations, dream funnels, gate verdicts) and the error a bad file raises."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from model.errors import UserError

REPORT_DIR = Path("reports/lifecycle")
PLOTS_DIR = Path("metrics/plots")
CL_METRICS_PATH = Path("metrics/continual_learning.json")
REPORT_MD = "report.md"
FIGURES = {
    "accuracy_matrix": "accuracy_matrix.png",
    "task_accuracy": "task_accuracy.png",
    "dream_funnel": "dream_funnel.png",
    "diagnostics": "diagnostics.png",
}
PLOT_CSVS = {
    "cycles": "cycles.csv",
    "task_accuracy": "task_accuracy.csv",
    "accuracy_matrix": "accuracy_matrix.csv",
    "dream_funnel": "dream_funnel.csv",
    "diagnostics": "diagnostics.csv",
}
FUNNEL_STAGES: tuple[str, ...] = ("generated", "selected", "rewarded", "passed_gate", "promoted", "rejected")
FUNNEL_REQUIRED: tuple[str, ...] = ("generated", "selected", "rewarded", "promoted")
NONE = "none"


class ReportError(UserError, ValueError):
    """A lifecycle metrics file that is missing or malformed; the message names the file and the field."""


# ---------------------------------------------------------------------------------------------
# What a lifecycle run left behind


@dataclass(frozen=True)
class HeldOut:
    """Held-out loss (nats/token) and accuracy on the period's task, as measured by the sleep."""

    loss: float | None
    accuracy: float | None


@dataclass(frozen=True)
class Consolidation:
    """One consolidation of a sleep: level ``src`` into a new expert (``slot``) of level ``dst``.

    ``retention_loss`` is ``(reset - consolidated) / (reset - teacher)`` on held-out loss (1: as
    good as before the reset, 0: no better than the reset); ``accuracy_ratio`` is consolidated
    accuracy over teacher accuracy. Both are None when undefined (a zero gap). The held-out
    measures come from ``metrics/consolidation/period-N.json`` and are None when it is absent.
    """

    src: str
    dst: str
    slot: int
    retention_loss: float | None
    accuracy_ratio: float | None
    teacher: HeldOut | None = None
    reset: HeldOut | None = None
    consolidated: HeldOut | None = None


@dataclass(frozen=True)
class DreamFunnel:
    """How many dreams of one sleep reached each stage (``passed_gate``/``rejected`` may be absent)."""

    generated: int
    selected: int
    rewarded: int
    promoted: int
    passed_gate: int | None = None
    rejected: int | None = None

    def stage(self, name: str) -> int | None:
        """The count of stage ``name`` (one of :data:`FUNNEL_STAGES`)."""
        return getattr(self, name)


@dataclass(frozen=True)
class GateSummary:
    """The dream gate's verdict for one sleep (``reports/dreams/period-N/gate.json``)."""

    n_dreams: int
    n_promoted: int
    n_rejected: int
    failing: dict[str, int]  # check name -> dreams failing it, only checks that failed
    report_md: Path | None  # gate.md beside gate.json, when present


@dataclass(frozen=True)
class Cycle:
    """One wake/sleep cycle: ``accuracy`` maps task id -> accuracy after the sleep."""

    period: int
    accuracy: dict[int, float]
    mean_accuracy_seen: float | None  # None while every period so far read plain passages only
    wake_loss_first: float
    wake_loss_last: float
    consolidations: tuple[Consolidation, ...]
    dream_funnel: DreamFunnel | None
    dreaming: str  # "on" (a funnel), "off" (dream.enabled false), "none" (no record of dreaming)
    gate: GateSummary | None = None
    # state (DIAGNOSTIC_STATES) -> task -> accuracy among all seen labels; empty when not measured
    diagnostics: dict[str, dict[int, float]] = field(default_factory=dict)
    # task -> share of its test inputs that prototype routing sent to the task's own period; empty without routing
    routing: dict[int, float] = field(default_factory=dict)

    @property
    def dreams_promoted(self) -> int | None:
        return self.dream_funnel.promoted if self.dream_funnel else None


@dataclass(frozen=True)
class LifecycleMetrics:
    """Everything the report shows, read from one lifecycle run.

    ``accuracy_matrix[i][j]`` is the accuracy on task ``j`` after the sleep of cycle ``i``
    (shape ``(T, T)``, None above the diagonal and in the column of a period that read plain
    passages only: ``passage_tasks``); ``sources`` lists the files read.
    """

    cycles: tuple[Cycle, ...]
    accuracy_matrix: tuple[tuple[float | None, ...], ...]
    final_mean_accuracy: float
    sources: tuple[Path, ...] = field(default=())
    passage_tasks: tuple[int, ...] = ()

    @property
    def n_tasks(self) -> int:
        return len(self.accuracy_matrix)
