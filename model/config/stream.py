"""The class-incremental stream (source and split) and the wake (paper eq. 2)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from model.config.base import Section


class SourceConfig(Section):
    """A labelled text dataset on disk: CLINC150's JSON or any CSV/JSON/JSONL table."""

    path: str = "data/raw/clinc150/data_full.json"
    format: Literal["clinc150", "csv", "json", "jsonl"] = "clinc150"
    text_field: str = "text"
    label_field: str = "label"
    split_field: str | None = Field(
        None, description="Column naming each row's split (train/test); null = split by seed."
    )
    exclude_labels: list[str] = Field(default_factory=lambda: ["oos"])
    max_text_chars: int = Field(
        20_000, ge=16, le=10_000_000, description="A row whose text is longer is an error naming the file and row "
        "(an enormous row would be tokenised, batched and dreamt about: memory, not learning).",
    )


class DataConfig(Section):
    """The class-incremental stream built by the ``prepare`` stage (docs/design.md §5)."""

    source: SourceConfig = Field(default_factory=SourceConfig)
    n_tasks: int = Field(3, ge=1, description="Tasks (periods) in the stream; each is one wake.")
    labels_per_task: int = Field(5, ge=1, description="Labels a task brings; no label comes back in a later task.")
    train_per_label: int = Field(20, ge=1, description="Training rows drawn per label (the wake reads them).")
    test_per_label: int = Field(10, ge=1, description="Held-out rows per label, to measure every seen task.")
    seed: int = Field(0, ge=0, description="Which labels go to which task, and which rows are drawn.")
    out_dir: str = Field("data/processed", description="Where the prepared stream goes (DVC tracks it).")


class WakeConfig(Section):
    """Online learning of the CMS during a wake period."""

    template: str = Field("{text} -> {label}", description="How an example is written; needs {text} and {label}.")
    batch_size: int = Field(8, ge=1, description="Examples per wake step.")
    epochs: int = Field(1, ge=1, description="Passes over a period's training rows.")
    max_length: int = Field(64, ge=4, description="Tokens of an example, prompt and label together; longer is cut.")
    eval_batch_size: int = Field(64, ge=1, description="Texts scored at once when measuring accuracy.")
    grad_clip: float = Field(1.0, gt=0, description="Largest gradient norm of a wake step.")
    threads: int = Field(2, ge=1, description="torch threads of a wake (and of the stages that set them from it).")
    deterministic: bool = Field(True, description="torch's deterministic algorithms in every stage that sets its "
                                "threads from wake.threads: no float sums whose order depends on thread timing "
                                "(model/runtime.py); off only to measure what it costs.")
    state_dir: str = "state/wake"
    metrics_dir: str = Field("metrics/wake", description="Training metrics, one JSON per period.")

    @field_validator("template")
    @classmethod
    def _template(cls, v: str) -> str:
        if "{text}" not in v or "{label}" not in v:
            raise ValueError("template must contain {text} and {label}")
        if not v.rstrip().endswith("{label}"):
            raise ValueError("template must end with {label} (the label is the scored continuation)")
        return v
