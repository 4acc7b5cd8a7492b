"""The lifecycle: cycles, the inbox of new data, states, metrics and retention."""

from __future__ import annotations

import yaml
from pydantic import Field, field_validator

from model.config.base import Section, run_id_problem


class CycleSpec(Section):
    """One cycle of the DVC pipeline (``dvc.yaml`` iterates over ``lifecycle.cycles``)."""

    period: int = Field(..., ge=0)
    after: str = Field(..., description="The file or state the cycle's wake stage depends on.")


class IntakeConfig(Section):
    """New data handed to a running model: `lm-sleep ingest` puts batches into an inbox under
    ``lifecycle.state_root``; a wake with ``--inbox`` consumes every accepted batch no wake has consumed."""

    inbox: str = Field("inbox", description="The inbox directory, under lifecycle.state_root: batches/, "
                       "quarantine/, the ledger and the open stream the inbox periods are read from.")
    text_field: str = Field("text", min_length=1, description="The field of an ingested row that holds its text.")
    label_field: str = Field("label", min_length=1, description="The field that holds its label; a file without it "
                             "is a batch of plain passages.")
    test_fraction: float = Field(0.2, ge=0.0, lt=1.0, description="Share of each label's rows of a batch held out "
                                 "to measure the model (seeded by the batch's content).")
    max_line_bytes: int = Field(1_000_000, ge=1_024, description="A longer line makes the whole file an error.")
    max_text_chars: int = Field(4_000, ge=1, description="A row with a longer text is quarantined.")
    max_label_chars: int = Field(200, ge=1, description="A row with a longer label is quarantined.")
    keep_periods: int = Field(3, ge=0, description="Retention: the states and dreams of the last N finished inbox "
                              "periods are kept, older ones deleted after each sleep (0: keep everything). The "
                              "prepared stream's periods (DVC outputs), pinned periods and every batch are kept.")
    pinned_periods: list[int] = Field(default_factory=list, description="Inbox periods never deleted (e.g. a "
                                      "published night).")

    @field_validator("keep_periods")
    @classmethod
    def _window(cls, v: int) -> int:
        if v == 1:
            raise ValueError("must be 0 (keep everything) or at least 2: a sleep reads the previous period's state")
        return v


class LifecycleConfig(Section):
    """Wake/sleep cycles over the stream and their evaluation."""

    metrics_dir: str = Field("metrics/lifecycle", description="Accuracy after each cycle, one JSON per period.")
    summary_path: str = Field(
        "metrics/lifecycle.json", description="Accuracy matrix; a <stem>_accuracy.csv beside it feeds the plots."
    )
    timings_dir: str = Field(
        "metrics/timings", description="Wall-clock timings of each stage, one JSON per stage and period "
        "(<stage>-period-N.json); apart from the metrics, which a rerun reproduces byte for byte."
    )
    diagnostics: bool = Field(
        True, description="Evaluate also measures every seen task in each state of a cycle (after the previous "
        "sleep, after wake with and without the fast level, after consolidation, after dreaming).",
    )
    state_root: str = Field("state", description="Directory holding every state of a run; one run at a time (locked).")
    publish: bool = Field(
        True, description="Publish each cycle's experts, dreams and reports to the artifact store "
        "(local 'artifacts/' unless LM_SLEEP_S3_BUCKET is set)."
    )
    cycles: list[CycleSpec] = Field(
        default_factory=list,
        description="One entry per wake/sleep cycle for DVC's per-cycle stages: {period: i, after: what "
        "the wake of cycle i starts from}; must match data.n_tasks (checked with the whole params).",
    )
    run_id: str | None = Field(
        None, description="Run id in the artifact store; default 'lifecycle-<digest of params>' (reruns overwrite it). "
        "$LM_SLEEP_RUN_ID overrides it (checked with the params).",
    )

    @field_validator("run_id")
    @classmethod
    def _run_id(cls, v: str | None) -> str | None:
        if v is not None and (why := run_id_problem(v)):
            raise ValueError(why)
        return v


#: Distillation steps of the methods that switch a part of consolidation's distillation (Learning to Imitate, the
#: semantic reward, teacher samples, the start, expansion, the dream fold): the comparisons' budget distilled 32 steps after the copy
#: until the copy alone (``consolidation.steps: 0``) replaced them by its development rule
#: (docs/results/issue13/dev-copy-steps/); with no step those switches would change nothing.
DISTILLATION_STEPS = 32
METHODS: dict[str, str] = {
    "zero_shot": "the base model, no training (label log-likelihood)",
    "icl": "in-context learning: k train examples per seen label in the prompt, no training",
    "finetune": "sequential fine-tuning of LoRA adapters, task after task",
    "ewc": "sequential LoRA fine-tuning with an elastic weight consolidation penalty",
    "replay": "sequential LoRA fine-tuning with experience replay from a reservoir buffer of past examples",
    "joint": "upper bound: LoRA fine-tuning on every task so far at once (all raw data), the same steps in all",
    "sentence_lda": "no language model, no raw data: each seen label's mean of the sentence model's embedding "
                    "(all-MiniLM-L6-v2) and one pooled covariance, nearest mean wins (streaming LDA; the statistics "
                    "sleep's router keeps)",
    "no_rehearsal": "full sleep without rehearsal: consolidation sees the current period's prompts only",
    "no_freezing": "full sleep, consolidated experts stay writable in wake (the slow level's eq.-2 step moves them)",
    "no_prototype_routing": "full sleep, every expert fires on every input (no period prototypes)",
    "cosine_routing": "full sleep, prototypes by spherical k-means and cosine (no shared covariance)",
    "sentence_routing": "full sleep, prototypes of the sentence model's embedding of each input (all-MiniLM-L6-v2) "
    "instead of a decoder layer's",
    "decoder_routing": "full sleep, prototypes of a decoder layer's mean residual stream (the router before the "
    "comparisons' sentence feature)",
    "with_routing": "full sleep plus the routing loss (routers fire on this period's inputs, not on dreamed inputs "
    "of other tasks; off by default: it did not help on the development runs)",
    "cms": "the continuum memory system learning online, without sleep",
    "sleep_consolidation": "wake + sleep with consolidation only (no dreaming)",
    "sleep": "wake + full sleep (consolidation and dreaming)",
    "no_imitation": "copy_distilled without Learning to Imitate (alpha = 1)",
    "no_semantic_reward": "copy_distilled without the semantic reward (gamma = 0)",
    "no_expansion": "full sleep without parameter expansion (the slow level's expert is trained in place, "
    f"{DISTILLATION_STEPS} steps)",
    "no_gradient_selection": "full sleep, dreams picked at random instead of by gradient importance",
    "no_random_expert": "full sleep, dreams without the random-expert dream mode",
    "no_dreaming": "full sleep without dreaming (same as sleep_consolidation, named as the paper's ablation)",
    "no_promotion_check": "full sleep, the dream stage's training kept whether or not it helped the period's unseen examples",
    "dreams_into_slow": "full sleep, dreams trained into the slow expert the sleep consolidated instead of the fast level",
    "fold_dreams": f"copy_distilled, dreams trained into the fast level, then distilled ({DISTILLATION_STEPS} steps) into "
    "the slow expert the sleep consolidated, and the fast level freed",
    "fold_with_dreams": "fold_dreams, the fold also distilling the dream-trained model on the promoted dreams' own "
    "text (every token), not only on the wake prompts",
    "keep_dreams": "full sleep, the fast expert a kept dream training wrote stays read-only with its period in the "
    "fast level, never freed; the next wake writes a new one (docs/results/issue13/dev-keep-dreams/)",
    "keep_dreams_slow": "full sleep, the fast expert a kept dream training wrote moves into a new read-only slow "
    "expert with its period and the fast level is freed; the slow level's merges retire it (the default sleep since "
    "docs/results/issue13/dev-keep-dreams-slow/)",
    "no_keep_dreams": "full sleep, the fast expert a kept dream training wrote is retagged and trained by the next wake "
    "(the sleep before keep_dreams_slow)",
    "same_period_merge": "full sleep, a full slow level merges the oldest two experts of one period (a kept dream "
    "expert and its period's consolidated one) before two periods' experts (the default sleep since "
    "docs/results/issue13/dev-same-period-merge/)",
    "oldest_merge": "full sleep, a full slow level merges its two oldest read-only experts, of one period or two "
    "(the sleep before same_period_merge)",
    "absorb_dreams": "full sleep, a kept dream expert that a full slow level could place only by merging two periods' "
    "experts is fitted into its own period's consolidated expert instead (the default sleep since "
    "docs/results/issue13/dev-absorb-dreams/)",
    "merge_for_dreams": "full sleep, a kept dream expert in a full slow level merges the pair merge_pair picks first, "
    "even two periods' experts (the sleep before absorb_dreams)",
    "one_teacher_sample": "copy_distilled, the consolidation's data D one teacher sample per buffered prompt (the "
    "sleep before consolidation.samples_per_prompt 2)",
    "zero_start": f"full sleep, the new slow expert starting from B = 0 and distilled {DISTILLATION_STEPS} steps (the "
    "paper's expansion; the sleep before consolidation.init copy)",
    "copy_distilled": f"full sleep, the new slow expert copied from the fast one, then distilled {DISTILLATION_STEPS} "
    "steps (the comparisons' sleep before the copy alone, consolidation.steps 0)",
    "check_merged_periods": "full sleep, a dream stage whose move into a full slow level merged earlier periods' "
    "experts is kept only if those periods' rehearsal dreams lost nothing (dream.check_merged_periods)",
    "merge_both_starts": "full sleep, each layer of a merge fitted from both experts' weights, the fit with the "
    "lower error kept (consolidation.merge_start: both)",
    "merge_in_view": "full sleep, a merge fits each of its prompts in the view of the period it routes to, to the "
    "pair's experts that answer there (an older period's inputs to the older expert alone)",
    "no_dream_policy": "full sleep, dreams sampled from the memory model and ReST-EM trained into the memory level "
    "(no dream policy of its own)",
}
