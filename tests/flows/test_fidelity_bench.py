"""bench/consolidation_fidelity.py's variants: a setting the wake applies is refused, the others parsed as YAML."""

from __future__ import annotations

import pytest

from bench.consolidation_fidelity import FIXED_BY_WAKE, _merged, _variant
from model.config.sleep import ConsolidationConfig


def test_a_variant_is_the_consolidation_settings_it_names_with_yaml_values() -> None:
    assert _variant("base") == {}
    assert _variant("samples_per_prompt=2,init=copy,lr=1.0e-9") == {"samples_per_prompt": 2, "init": "copy", "lr": 1e-9}
    with pytest.raises(SystemExit, match="expected base or key=value"):
        _variant("steps")


def test_a_setting_the_wake_applies_cannot_be_varied_on_a_saved_wake_state() -> None:
    # the wake keeps the prompt buffer (tasks/wake.py): a replayed consolidation reads the prompts the state holds,
    # so prompt_buffer_size=100 would rerun the run's own buffer under another name
    assert set(FIXED_BY_WAKE) <= set(ConsolidationConfig.model_fields)
    with pytest.raises(SystemExit, match="consolidation.prompt_buffer_size is applied by the wake"):
        _variant("samples_per_prompt=2,prompt_buffer_size=100")


def test_a_dotted_key_sets_one_field_of_a_subsection_and_keeps_the_rest() -> None:
    over = _variant("rehearsal.steps=8,lr=0.01")
    assert over == {"rehearsal": {"steps": 8}, "lr": 0.01}
    run = {"lr": 0.001, "steps": 0, "rehearsal": {"batch_size": 8, "per_label": 4}}
    merged = _merged(run, over)
    assert merged == {"lr": 0.01, "steps": 0, "rehearsal": {"batch_size": 8, "per_label": 4, "steps": 8}}
    assert run["rehearsal"] == {"batch_size": 8, "per_label": 4}  # the run's own settings are not changed
    ConsolidationConfig(**{**merged, "init": "copy"})  # and the result is a valid section
