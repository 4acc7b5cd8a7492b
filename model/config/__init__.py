"""Typed configuration for every stage, loaded from one ``params.yaml``.

Each section of params.yaml maps to one pydantic model below. Unknown keys are
rejected and ranges are checked, so a typo fails loudly with the file and the
dotted field name instead of being silently ignored. Defaults live here, not in
tasks or flows. Secrets never live in params: they come from the environment.

One module per part of the system: ``base`` (the strict section, errors), ``memory`` (model, sampler,
levels, routing, CMS), ``stream`` (data and wake), ``sleep`` (consolidation, rehearsal, dreaming), ``lifecycle``,
``evaluation`` (comparisons and their kinds) and ``params`` (the whole file, :func:`load_params` and :func:`load_project`).
"""

from __future__ import annotations

from model.config.base import (  # noqa: F401
    ConfigError,
    RUN_ID_ENV,
    RUN_ID_RE,
    Section,
    format_errors,
    run_id_problem,
)
from model.config.evaluation import (  # noqa: F401
    BaselinesConfig,
    ComparisonConfig,
    EvaluationConfig,
    KNOWLEDGE_METHODS,
    KnowledgeConfig,
    LONG_CONTEXT_METHODS,
    LONG_CONTEXT_TASKS,
    LRSearchConfig,
    LR_SEARCH_METHODS,
    LongContextConfig,
    METHOD_OVERRIDES,
    MethodName,
    QUICK_KEYS,
    STORES_RAW_DATA,
    cms_lr_overrides,
    merge_overrides,
    quick_section,
)
from model.config.lifecycle import (  # noqa: F401
    CycleSpec,
    IntakeConfig,
    LifecycleConfig,
    METHODS,
)
from model.config.memory import (  # noqa: F401
    CMSConfig,
    LevelConfig,
    ModelConfig,
    RoutingConfig,
    SamplingConfig,
)
from model.config.params import (  # noqa: F401
    OUTPUT_PATHS,
    PREPARED_STREAM_MARK,
    Params,
    check_project_paths,
    load_params,
    load_project,
)
from model.config.sleep import (  # noqa: F401
    ConsolidationConfig,
    DreamConfig,
    DreamGateConfig,
    DreamPolicyConfig,
    EXAMPLES_PROMPT,
    PolicyTrainingConfig,
    REHEARSAL_PROMPT,
    REHEARSAL_SHOT,
    RehearsalConfig,
    SEAL_IMPLICATIONS,
)
from model.config.stream import (  # noqa: F401
    DataConfig,
    SourceConfig,
    WakeConfig,
)

__all__ = [
    "BaselinesConfig",
    "CMSConfig",
    "ComparisonConfig",
    "ConfigError",
    "ConsolidationConfig",
    "CycleSpec",
    "DataConfig",
    "DreamConfig",
    "DreamGateConfig",
    "DreamPolicyConfig",
    "EXAMPLES_PROMPT",
    "EvaluationConfig",
    "IntakeConfig",
    "KNOWLEDGE_METHODS",
    "KnowledgeConfig",
    "LONG_CONTEXT_METHODS",
    "LONG_CONTEXT_TASKS",
    "LRSearchConfig",
    "LR_SEARCH_METHODS",
    "LevelConfig",
    "LifecycleConfig",
    "LongContextConfig",
    "METHODS",
    "METHOD_OVERRIDES",
    "MethodName",
    "ModelConfig",
    "OUTPUT_PATHS",
    "PREPARED_STREAM_MARK",
    "Params",
    "PolicyTrainingConfig",
    "QUICK_KEYS",
    "REHEARSAL_PROMPT",
    "REHEARSAL_SHOT",
    "RUN_ID_ENV",
    "RUN_ID_RE",
    "RehearsalConfig",
    "RoutingConfig",
    "SEAL_IMPLICATIONS",
    "STORES_RAW_DATA",
    "SamplingConfig",
    "Section",
    "SourceConfig",
    "WakeConfig",
    "check_project_paths",
    "cms_lr_overrides",
    "format_errors",
    "load_params",
    "load_project",
    "merge_overrides",
    "quick_section",
    "run_id_problem",
]
