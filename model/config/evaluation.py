"""Comparisons and baselines, knowledge incorporation, long context, the learning-rate search."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from model.config.base import ConfigError, Section, format_errors
from model.config.lifecycle import DISTILLATION_STEPS, METHODS
from model.config.memory import CMSConfig
from model.config.sleep import PolicyTrainingConfig


#: Methods that keep raw examples of past tasks (the target compares sleep with the others).
STORES_RAW_DATA = frozenset({"icl", "replay", "joint"})
#: What each method of the CMS family changes in params (applied after the comparison's overrides).
METHOD_OVERRIDES: dict[str, dict[str, Any]] = {
    "cms": {"consolidation": {"enabled": False}, "dream": {"enabled": False}},
    "sleep_consolidation": {"dream": {"enabled": False}},
    "sleep": {"lifecycle": {"diagnostics": True}},
    "no_imitation": {"consolidation": {"alpha": 1.0, "steps": DISTILLATION_STEPS}},
    "no_semantic_reward": {"consolidation": {"gamma": 0.0, "steps": DISTILLATION_STEPS}},
    "no_expansion": {"consolidation": {"expand": False, "steps": DISTILLATION_STEPS}},
    "no_gradient_selection": {"dream": {"importance": "random"}},
    "no_random_expert": {"dream": {"random_expert": False}},
    "no_dreaming": {"dream": {"enabled": False}},
    "no_promotion_check": {"dream": {"promotion_check": False}},
    "dreams_into_slow": {"dream": {"train_into": "consolidated"}},
    "fold_dreams": {"dream": {"fold_into_slow": True}, "consolidation": {"steps": DISTILLATION_STEPS}},
    "fold_with_dreams": {"dream": {"fold_into_slow": True, "fold_dream_weight": 1.0},
                         "consolidation": {"steps": DISTILLATION_STEPS}},
    "keep_dreams": {"dream": {"keep_dreams": True, "keep_dreams_in": "fast"}},
    "keep_dreams_slow": {"dream": {"keep_dreams": True, "keep_dreams_in": "slow"}},
    "absorb_dreams": {"dream": {"keep_dreams_when_full": "absorb"}},
    "merge_for_dreams": {"dream": {"keep_dreams_when_full": "merge"}},
    "no_keep_dreams": {"dream": {"keep_dreams": False}},
    "same_period_merge": {"consolidation": {"merge_pair": "same_period"}},
    "oldest_merge": {"consolidation": {"merge_pair": "oldest"}},
    "merge_in_view": {"consolidation": {"merge_in_view": True}},
    "merge_both_starts": {"consolidation": {"merge_start": "both"}},
    "check_merged_periods": {"dream": {"check_merged_periods": True}},
    "one_teacher_sample": {"consolidation": {"samples_per_prompt": 1, "steps": DISTILLATION_STEPS}},
    "zero_start": {"consolidation": {"init": "zero", "steps": DISTILLATION_STEPS}},
    "copy_distilled": {"consolidation": {"steps": DISTILLATION_STEPS}},
    "no_dream_policy": {"dream": {"policy": {"enabled": False}}},
    "no_rehearsal": {"consolidation": {"rehearsal": {"enabled": False, "steps": 0}}},
    "no_freezing": {"cms": {"freeze_consolidated": False}},
    "with_routing": {"cms": {"routing": {"enabled": True}}},
    "no_prototype_routing": {"cms": {"routing": {"by_prototype": False}}},
    "cosine_routing": {"cms": {"routing": {"metric": "cosine"}}},
    "sentence_routing": {"cms": {"routing": {"feature": "sentence"}}},
    "decoder_routing": {"cms": {"routing": {"feature": "decoder"}}},
}


def cms_lr_overrides(cms: "CMSConfig", lr: float) -> dict[str, Any]:
    """Overrides that set the fastest level's wake learning rate to ``lr``, every slower level keeping its
    ratio to it (how a CMS method's learning rate is searched and set)."""
    factor = lr / cms.levels[0].lr
    levels = [level.model_dump(mode="json") | {"lr": level.lr * factor} for level in cms.levels]
    return {"cms": {"levels": levels}}


#: The methods of a knowledge-incorporation comparison (``kind: knowledge``; model/evaluation/incorporation.py).
KNOWLEDGE_METHODS: dict[str, str] = {
    "base": "the base model, nothing trained",
    "passage_finetune": "the fast level fine-tuned on the passage text (in pieces), promote_steps steps",
    "base_dreams": "dreams sampled from the base model (no random expert, selection, trials, ReST-EM or gate), "
    "all trained into the fast level for promote_steps steps (SEAL without its RL loop)",
    "sleep": "the full dream stage: dream mode, gradient selection, isolated trials, ReST-EM, the Great "
    "Expectations gate, promotion",
    "passage_dreams": "passage_finetune (the wake), then every dream of the untrained policy trained in on top "
    "(no selection, trials or gate)",
    "passage_sleep": "passage_finetune (the wake), then the full dream stage on top, dreams from the untrained policy",
    "passage_sleep_trained": "passage_sleep with the dream policy trained by ReST-EM on the training pool "
    "(knowledge.policy_training), frozen while the evaluation passages are learned",
}
#: The methods of a long-context comparison (``kind: long_context``; model/evaluation/long_context_methods.py).
LONG_CONTEXT_METHODS: dict[str, str] = {
    "facts_only": "a reference, not a reader: the question after the item's facts alone, no distractor prose "
    "(BABILong's 0k): the ceiling of what recall could reach with this model",
    "in_context": "no training: the question after as much of the document's end as fits the window",
    "retrieval": "no training: the question after the window-sized piece closest to it by the MiniLM embedder",
    "finetune": "LoRA adapters learn next-token prediction on the document's pieces, one step per piece",
    "cms": "the continuum memory system reads the pieces as a wake does (eq. 2), no sleep",
    "sleep_1": "the CMS wake with one slower level and sleeps (Knowledge Seeding) every sleep_every pieces",
    "sleep_2": "sleep_1 with two slower levels (the second consolidated into every fourth sleep)",
    "sleep_3": "sleep_1 with three slower levels (more consolidation stages)",
}
MethodName = Literal[
    "zero_shot", "icl", "finetune", "ewc", "replay", "joint", "sentence_lda", "cms", "sleep_consolidation", "sleep",
    "no_imitation",
    "no_rehearsal", "no_freezing", "with_routing", "no_prototype_routing", "cosine_routing",
    "no_semantic_reward", "no_expansion", "no_gradient_selection", "no_random_expert", "no_dreaming",
    "no_promotion_check", "dreams_into_slow", "fold_dreams", "fold_with_dreams", "keep_dreams", "keep_dreams_slow",
    "no_keep_dreams", "same_period_merge", "oldest_merge", "merge_in_view", "merge_both_starts", "absorb_dreams",
    "merge_for_dreams", "check_merged_periods", "one_teacher_sample", "zero_start", "copy_distilled", "sentence_routing",
    "decoder_routing",
    "no_dream_policy", "base", "passage_finetune",
    "base_dreams", "passage_dreams", "passage_sleep", "passage_sleep_trained", "facts_only", "in_context", "retrieval",
    "sleep_1", "sleep_2", "sleep_3",
]


class BaselinesConfig(Section):
    """Hyperparameters of the baselines (same data, model, batches and wake steps as the CMS methods)."""

    lora_r: int = Field(8, ge=1, description="LoRA rank of finetune / ewc / replay.")
    lora_alpha: float = Field(16.0, gt=0)
    lora_targets: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1)
    lr: float = Field(1e-3, gt=0, le=1.0, description="AdamW learning rate of a LoRA baseline "
                    "not in evaluation.lrs.")
    ewc_lambda: float = Field(1000.0, ge=0, description="EWC: lambda of lambda/2 * sum F (theta - theta*)^2.")
    ewc_fisher_batch_size: int = Field(
        32, ge=1, le=1024,
        description="EWC: examples per forward/backward pass of the empirical Fisher (each example's gradient "
                    "is still squared on its own; the estimate does not depend on it).",
    )
    replay_buffer: int = Field(50, ge=1, description="replay: examples kept (reservoir sampling over all seen).")
    replay_per_batch: int = Field(5, ge=1, description="replay: buffered examples added to every batch.")
    icl_shots_per_label: int = Field(1, ge=1, description="icl: train examples per seen label in the prompt.")
    icl_max_length: int = Field(1024, ge=16, description="icl: token limit of prompt + label.")
    lda_shrinkage: float = Field(0.5, ge=0.0, le=1.0, description="sentence_lda: the pooled covariance's weight on "
                                 "the identity (cms.routing.shrinkage's value: the router's own statistics).")


class KnowledgeConfig(Section):
    """The passages of a knowledge-incorporation comparison and how they are learned (docs/design.md §5).

    single: every passage from the same fresh state (n=1), measured right after it;
    continued: one state learns the passages one after the other (continued pretraining)
    and every passage's questions are answered at the end.
    """

    passages: str = Field("data/raw/squad/squad_val_seal_eval200.json", description="SQuAD-format passages "
                          "(model.evaluation.knowledge.load_passages), relative to the project root.")
    n_passages: int = Field(200, ge=1, description="Passages used, from offset on; more than the file holds "
                            "is an error before anything trains.")
    offset: int = Field(0, ge=0, description="Index of the first passage used.")
    mode: Literal["single", "continued"] = "single"
    tau_every: int = Field(0, ge=0, description="continued: also measure tau over the passages learned so far "
                           "after every k passages (0: only at the end).")
    passage_experts: Literal["sleep", "all", "none"] = Field(
        "sleep", description="continued: which methods end each passage as a sleep does, its fast level "
        "consolidated into a read-only expert of the slowest level that answers the questions routed to the "
        "passage (model/memory/passage_experts.py; the slowest level needs a slot per passage): 'sleep' the "
        "methods that sleep (sleep, passage_sleep, passage_sleep_trained), 'all' every method that learns (the "
        "ablation that gives fine-tuning the same memory), 'none' every method trains one shared fast level.")
    policy_training: PolicyTrainingConfig = Field(
        default_factory=PolicyTrainingConfig, description="How the trained dream policy of method "
        "passage_sleep_trained is trained (before it runs, once per seed).")


LONG_CONTEXT_TASKS = ("qa1", "qa2", "qa3", "needle")


class LongContextConfig(Section):
    """The documents of a long-context comparison: bAbI stories or needles hidden in distractor prose (issue #16).

    Every document is read from the same fresh state by every method; its question is then asked
    with no document in the prompt (in_context and retrieval: with their piece of it).
    """

    babi_dir: str = Field("data/raw/babi", description="Folder of the bAbI files (qaN_*_train.txt / _test.txt), "
                          "relative to the project root.")
    split: Literal["dev", "test"] = Field("test", description="test: the bAbI _test files (report); dev: the "
                                          "_train files (make choices here, never on test).")
    tasks: list[Literal["qa1", "qa2", "qa3", "needle"]] = Field(
        default_factory=lambda: ["qa1", "qa2", "qa3", "needle"], min_length=1)
    items_per_task: int = Field(4, ge=1, description="Stories (needle: items) per task and seed, a seeded draw.")
    needle_keys: int = Field(4, ge=1, le=12, description="needle: key -> value facts per document (one asked).")
    distractors: str = Field("data/raw/squad/squad_val_dev800.json", description="The haystack's prose: "
                             "SQuAD-format passages (their contexts) or a .txt file, relative to the project root.")
    lengths: list[int] = Field(default_factory=lambda: [1024, 4096, 16384, 65536], min_length=1,
                               description="Document lengths in tokens of the model's tokenizer.")
    window: int = Field(512, ge=32, le=32768, description="Tokens per piece a wake step reads, and the "
                        "in-context / retrieval window.")
    sleep_every: int = Field(8, ge=1, description="Pieces per wake period: a sleep after each (sleep methods).")
    epochs: int = Field(1, ge=1, le=16, description="Passes over the document's pieces (every reading method).")
    prompt_tokens: int = Field(64, ge=4, description="Tokens of each consolidation prompt (a sentence end's past).")
    scoring: Literal["pmi", "loglik"] = Field(
        "pmi", description="How a candidate answer is chosen: pmi (its log-likelihood after the question minus "
        "after a content-free prompt, so the model's standing favourite answer is not recall) or loglik.")

    @field_validator("lengths", "tasks")
    @classmethod
    def _distinct(cls, v: list) -> list:
        if len(set(v)) != len(v):
            raise ValueError(f"listed twice: {sorted({str(x) for x in v if v.count(x) > 1})}")
        if v and isinstance(v[0], int) and min(v) < 64:
            raise ValueError(f"lengths must be at least 64 tokens, got {min(v)}")
        return v


class ComparisonConfig(Section):
    """A named comparison: methods x seeds on the same data and budget (``lm-sleep compare NAME``).

    ``kind: continual`` (class-incremental stream, METHODS) or ``kind: knowledge``
    (SQuAD passages answered without context, KNOWLEDGE_METHODS; needs ``knowledge``).
    """

    kind: Literal["continual", "knowledge", "long_context"] = Field(
        "continual", description="What is compared: continual learning over the stream, knowledge incorporation, "
        "or long documents read into memory (long_context).")
    knowledge: KnowledgeConfig | None = Field(None, description="kind knowledge: the passages and the mode.")
    long_context: LongContextConfig | None = Field(None, description="kind long_context: the documents.")
    methods: list[MethodName] = Field(..., min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1,
                             description="Each seed sets params.seed and data.seed (another draw of the tasks).")
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="Parameters changed for every run of this comparison, nested like "
        "params.yaml (e.g. {consolidation: {steps: 20}}); checked like params.yaml.",
    )
    description: str = ""

    @model_validator(mode="after")
    def _kind(self) -> "ComparisonConfig":
        if self.kind != "long_context" and self.long_context is not None:
            raise ValueError(f"long_context: only for kind 'long_context' (this comparison is kind '{self.kind}')")
        if self.kind == "long_context":
            if self.long_context is None:
                raise ValueError("long_context: required when kind is 'long_context' ({tasks, lengths, window, ...})")
            if self.knowledge is not None:
                raise ValueError("knowledge: only for kind 'knowledge' (this comparison is kind 'long_context')")
            allowed = LONG_CONTEXT_METHODS
        elif self.kind == "knowledge":
            if self.knowledge is None:
                raise ValueError("knowledge: required when kind is 'knowledge' ({passages, n_passages, offset, mode})")
            allowed = KNOWLEDGE_METHODS
        else:
            if self.knowledge is not None:
                raise ValueError("knowledge: only for kind 'knowledge' (this comparison is kind 'continual')")
            allowed = METHODS
        bad = [m for m in self.methods if m not in allowed]
        if bad:
            raise ValueError(f"methods: {', '.join(bad)} not a method of kind '{self.kind}' "
                             f"(its methods: {', '.join(allowed)})")
        return self

    @field_validator("methods", "seeds")
    @classmethod
    def _unique(cls, v: list) -> list:
        dup = sorted({str(x) for x in v if v.count(x) > 1})
        if dup:
            raise ValueError(f"listed twice: {', '.join(dup)}")
        return v


#: Methods whose learning rate `lm-sleep lr-search` can tune: the LoRA baselines and the CMS family.
LR_SEARCH_METHODS = ("finetune", "ewc", "replay", "joint", "cms", "sleep_consolidation", "sleep")


class LRSearchConfig(Section):
    """The learning-rate search that gives every method the same tuning budget (``lm-sleep lr-search``).

    Every method of ``methods`` runs with each value of ``grid`` on development streams: the
    comparison ``comparison``'s budget and sizes, drawn from labels that no seed of any
    continual comparison puts in its stream, so no evaluation task is ever used for tuning.
    A LoRA baseline's value is its AdamW learning rate; a CMS method's value is the fastest
    level's wake learning rate, every slower level keeping its ratio to it.
    """

    comparison: str = Field("default", description="The continual comparison whose overrides (budget, sizes) "
                            "the search runs with.")
    methods: list[MethodName] = Field(default_factory=lambda: ["finetune", "ewc", "replay", "joint", "cms", "sleep"],
                                      min_length=1)
    grid: list[float] = Field(default_factory=lambda: [1e-3, 3e-3, 1e-2], min_length=2,
                              description="The learning rates tried, the same for every method.")
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1,
                             description="Development seeds (each draws its own dev tasks).")

    @field_validator("methods")
    @classmethod
    def _tunable(cls, v: list[str]) -> list[str]:
        bad = [m for m in v if m not in LR_SEARCH_METHODS]
        if bad:
            raise ValueError(f"{', '.join(bad)}: no learning rate to search (tunable: {', '.join(LR_SEARCH_METHODS)})")
        if len(set(v)) != len(v):
            raise ValueError("a method is listed twice")
        return v

    @field_validator("grid")
    @classmethod
    def _grid(cls, v: list[float]) -> list[float]:
        if any(not 0 < x <= 1.0 for x in v) or len(set(v)) != len(v):
            raise ValueError(f"learning rates must be distinct and in (0, 1]: {v}")
        return sorted(v)


class EvaluationConfig(Section):
    """Comparisons of sleep with baselines and ablations (docs/design.md §5; ``lm-sleep compare``)."""

    work_dir: str = Field("state/compare", description="Per comparison, method and seed: its states and result.")
    reports_dir: str = Field("reports", description="reports/<comparison>/: table, plots, metrics.")
    baselines: BaselinesConfig = Field(default_factory=BaselinesConfig)
    quick: dict[str, Any] = Field(
        default_factory=dict, description="Overrides of `compare --quick` (a smoke run), applied last; may "
        "set seeds, and knowledge (e.g. {n_passages: 2}), merged into every knowledge comparison's knowledge.",
    )
    comparisons: dict[str, ComparisonConfig] = Field(default_factory=dict)
    lr_search: LRSearchConfig = Field(default_factory=LRSearchConfig)
    workers: int = Field(
        1, ge=1, le=1024, description="1: a comparison's runs (method x seed) one after the other in its process; "
        "N > 1: every run not finished yet is a Prefect task (comparison-run) on the task runner `runner`, up to N at "
        "once. Each run uses wake.threads threads: keep workers x threads within the cores. Results do not depend "
        "on it (not in a run's key).",
    )
    runner: str = Field(
        "prefect_dask.DaskTaskRunner", pattern=r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)+$",
        description="Qualified class name of the Prefect task runner of a comparison's runs (workers > 1).",
    )
    runner_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments of runner. Empty with the Dask runner: a local cluster "
        "of `workers` processes, started for the comparison; {address: tcp://host:8786} uses a running Dask "
        "scheduler, whose workers must see this project's directory at the same path.",
    )
    lrs: dict[str, float] = Field(
        default_factory=dict, description="A method's own learning rate in comparisons, where the search chose one "
        "that differs from the params: a LoRA baseline's AdamW rate, or a CMS method's fast-level wake rate "
        "(slower levels keep their ratio). `lm-sleep lr-search` writes the table to choose from.",
    )

    @field_validator("lrs")
    @classmethod
    def _lrs(cls, v: dict[str, float]) -> dict[str, float]:
        bad = [m for m in v if m not in LR_SEARCH_METHODS]
        if bad:
            raise ValueError(f"{', '.join(bad)}: no learning rate to set (tunable: {', '.join(LR_SEARCH_METHODS)})")
        out = {m: x for m, x in v.items() if not (isinstance(x, (int, float)) and 0 < x <= 1.0)}
        if out:
            raise ValueError(f"learning rates must be in (0, 1]: {out}")
        return v

    @field_validator("comparisons")
    @classmethod
    def _names(cls, v: dict) -> dict:
        import re

        bad = [k for k in v if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}", k)]
        if bad:
            raise ValueError(f"comparison names must be letters, digits, '-' or '_': {bad}")
        return v


#: Keys of evaluation.quick that are not params overrides.
QUICK_KEYS = frozenset({"seeds", "knowledge", "long_context"})


def quick_section(section: Section, quick: dict[str, Any], key: str, where: str) -> Section:
    """A comparison's ``section`` (its ``knowledge`` or ``long_context``) with ``quick[key]`` merged in and
    checked; a ConfigError names ``where``."""
    extra = quick.get(key) or {}
    if not isinstance(extra, dict):
        raise ConfigError(f"{where}: must be a mapping of {type(section).__name__} fields, got {extra!r}")
    try:
        return type(section).model_validate(merge_overrides(section.model_dump(), extra))
    except ValidationError as e:
        raise ConfigError(format_errors(Path(where), e)) from None


def merge_overrides(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` merged in, recursively for mappings (neither is modified)."""
    out = dict(base)
    for k, v in overrides.items():
        out[k] = merge_overrides(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
