"""params.yaml is loaded into typed config that rejects unknown keys and bad ranges."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from model.config import ConfigError, Params, load_params

ROOT = Path(__file__).resolve().parents[2]


def test_real_params_file_loads():
    p = load_params(ROOT / "params.yaml")
    assert isinstance(p, Params)
    assert p.model.source == "embedded"
    assert [lvl.name for lvl in p.cms.levels] == ["fast", "slow"]
    assert p.cms.levels[0].d_low == 64


def _write(tmp_path, data) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    "data, field",
    [
        ({"wake": {"batch_sise": 4}}, "wake.batch_sise: unknown key"),
        ({"cms": {"levels": [{"name": "a", "chunk_size": 1, "lr": -1}]}}, "cms.levels.0.lr"),
        ({"cms": {"levels": [{"name": "a", "chunk_size": 2, "lr": 1e-3}, {"name": "b", "chunk_size": 3, "lr": 1e-3}]}}, "divisible"),
        ({"data": {"n_tasks": 0}}, "data.n_tasks"),
        ({"model": {"source": "path"}}, "model.path is required"),
        ({"wake": {"template": "{label} {text}"}}, "must end with {label}"),
        ({"cms": {"levels": [{"name": "a", "chunk_size": 1, "lr": 1e-3, "n_experts": 1, "initial_experts": 2}]}}, "initial_experts"),
    ],
)
def test_bad_params_name_file_and_field(tmp_path, data, field):
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as e:
        load_params(path)
    assert str(path) in str(e.value) and field in str(e.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("wake: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
