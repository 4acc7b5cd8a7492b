"""The whole params.yaml (one section per stage), project paths, and :func:`load_params`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, model_validator

from model.config.base import ConfigError, RUN_ID_ENV, Section, format_errors, run_id_problem
from model.config.evaluation import (EvaluationConfig, METHOD_OVERRIDES, QUICK_KEYS, merge_overrides,
                                     quick_section)
from model.config.lifecycle import IntakeConfig, LifecycleConfig
from model.config.memory import CMSConfig, ModelConfig, SamplingConfig
from model.config.sleep import ConsolidationConfig, DreamConfig
from model.config.stream import DataConfig, WakeConfig


class Params(Section):
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
            raise ConfigError(format_errors(Path(where), e)) from None

    @model_validator(mode="after")
    def _comparisons_valid(self) -> "Params":
        for name, comp in self.evaluation.comparisons.items():
            for extra in ({}, self.evaluation.quick):
                quick = {k: v for k, v in extra.items() if k not in QUICK_KEYS}
                self.for_run(merge_overrides(comp.overrides, quick), f"evaluation.comparisons.{name}.overrides")
            for method in comp.methods:  # a method's switches on this comparison's budget (tasks/compare.py run_params)
                if METHOD_OVERRIDES.get(method):
                    self.for_run(merge_overrides(comp.overrides, METHOD_OVERRIDES[method]),
                                 f"evaluation.comparisons.{name}.methods ({method}: {METHOD_OVERRIDES[method]})")
            if comp.knowledge is not None:
                quick_section(comp.knowledge, self.evaluation.quick, "knowledge", f"evaluation.quick.knowledge ({name})")
            if comp.long_context is not None:
                quick_section(comp.long_context, self.evaluation.quick, "long_context",
                              f"evaluation.quick.long_context ({name})")
        return self

    @model_validator(mode="after")
    def _fold_needs_steps(self) -> "Params":
        if self.dream.fold_into_slow and self.consolidation.steps == 0:
            raise ValueError("dream.fold_into_slow distils the dream-trained fast level into the slow expert in "
                             "consolidation.steps steps: with steps 0 nothing would be folded and the dreams lost")
        return self

    @model_validator(mode="after")
    def _cycles_match_tasks(self) -> "Params":
        got = [c.model_dump() for c in self.lifecycle.cycles]
        if got and got != self.expected_cycles():
            want = ", ".join(f"{{period: {c['period']}, after: {c['after']}}}" for c in self.expected_cycles())
            raise ValueError(f"lifecycle.cycles must list one cycle per task of data.n_tasks "
                             f"({self.data.n_tasks}); write cycles: [{want}]")
        return self


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


#: yaml.safe_load's loader in C where PyYAML has libyaml (the same safe subset, ~10x faster: every stage reads
#: params.yaml two or three times, 60 ms each in Python)
_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params file; raise ConfigError naming the file and field."""
    path = Path(path)
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_SAFE_LOADER)
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
        raise ConfigError(format_errors(path, e)) from None
    check_project_paths(params, path.resolve().parent, path)
    return params


def load_project(path: str | Path = "params.yaml") -> tuple[Params, Path]:
    """The params of ``path`` and the project directory their relative paths start from (the file's folder)."""
    return load_params(path), Path(path).resolve().parent
