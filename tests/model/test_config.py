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
        ({"cms": {"levels": [{"name": "a", "chunk_size": 1, "lr": 1e-3, "n_experts": 3, "top_k": 4}]}},
         "top_k (4) > n_experts (3)"),
        ({"dream": {"fold_into_slow": True, "train_into": "consolidated"}}, "fold_into_slow"),
        ({"dream": {"keep_dreams": True, "keep_dreams_in": "medium"}}, "dream.keep_dreams_in"),
        ({"consolidation": {"steps": 0, "init": "zero"}}, "steps 0 keeps the copy"),
        ({"consolidation": {"steps": 0, "init": "copy", "expand": False}}, "expand false"),
        ({"consolidation": {"steps": 0, "init": "copy"}, "dream": {"fold_into_slow": True}},
         "with steps 0 nothing would be folded"),
        ({"consolidation": {"rehearsal": {"enabled": False, "steps": 8}}}, "no dream is written"),
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


def _comparison(tmp_path, comp, quick=None) -> Path:
    return _write(tmp_path, {"evaluation": {"comparisons": {"k": comp}, **({"quick": quick} if quick else {})}})


def test_real_knowledge_comparisons_and_their_quick_run():
    p = load_params(ROOT / "params.yaml")
    single, cpt = p.evaluation.comparisons["knowledge"], p.evaluation.comparisons["knowledge-cpt"]
    assert (single.kind, single.knowledge.mode, single.knowledge.n_passages, single.seeds) == ("knowledge", "single", 200, [0])
    assert (cpt.knowledge.mode, cpt.knowledge.n_passages, cpt.seeds) == ("continued", 200, [0, 1, 2])
    assert single.methods == cpt.methods == ["base", "passage_finetune", "base_dreams", "sleep"]
    assert p.evaluation.comparisons["default"].kind == "continual" and p.evaluation.comparisons["default"].knowledge is None


@pytest.mark.parametrize(("comp", "quick", "message"), [
    ({"kind": "knowledge", "methods": ["base"]}, None, "knowledge: required when kind is 'knowledge'"),
    ({"knowledge": {"n_passages": 2}, "methods": ["sleep"]}, None, "knowledge: only for kind 'knowledge'"),
    ({"kind": "knowledge", "knowledge": {}, "methods": ["base", "cms"]}, None,
     "methods: cms not a method of kind 'knowledge'"),
    ({"methods": ["sleep", "passage_finetune"]}, None, "methods: passage_finetune not a method of kind 'continual'"),
    ({"kind": "knowledge", "knowledge": {"n_passages": 0}, "methods": ["base"]}, None, "knowledge.n_passages"),
    ({"kind": "knowledge", "knowledge": {"mode": "batch"}, "methods": ["base"]}, None, "knowledge.mode"),
    ({"kind": "knowledge", "knowledge": {"n_pasages": 3}, "methods": ["base"]}, None, "knowledge.n_pasages: unknown key"),
    ({"kind": "knowledge", "knowledge": {}, "methods": ["base"]}, {"knowledge": {"n_passages": -1}},
     "evaluation.quick.knowledge (k)"),
])
def test_bad_comparison_kind_knowledge_or_methods_name_the_field(tmp_path, comp, quick, message):
    path = _comparison(tmp_path, comp, quick)
    with pytest.raises(ConfigError) as e:
        load_params(path)
    assert str(path) in str(e.value) and message in str(e.value)


@pytest.mark.parametrize("run_id", ["../x", "a/b", "a..b", ".hidden", "", "x" * 129])
def test_a_run_id_that_could_leave_the_store_is_refused_with_the_params(tmp_path, run_id, monkeypatch):
    monkeypatch.delenv("LM_SLEEP_RUN_ID", raising=False)
    with pytest.raises(ConfigError, match="lifecycle.run_id: invalid run id"):
        load_params(_write(tmp_path, {"lifecycle": {"run_id": run_id}}))
    monkeypatch.setenv("LM_SLEEP_RUN_ID", run_id or "/")
    with pytest.raises(ConfigError, match=r"lifecycle.run_id \(from \$LM_SLEEP_RUN_ID\): invalid run id"):
        load_params(_write(tmp_path, {}))  # the environment's override is refused as early


def test_a_good_run_id_passes_in_params_and_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("LM_SLEEP_RUN_ID", "2025-01-01T12.00_a")
    assert load_params(_write(tmp_path, {"lifecycle": {"run_id": "nightly-3"}})).lifecycle.run_id == "nightly-3"


def test_max_text_chars_is_range_checked(tmp_path):
    with pytest.raises(ConfigError, match="data.source.max_text_chars"):
        load_params(_write(tmp_path, {"data": {"source": {"max_text_chars": 0}}}))
    assert load_params(_write(tmp_path, {})).data.source.max_text_chars == 20_000


def test_every_input_error_is_one_user_error():
    """The command line catches one class (model/errors.py); each module's error is one, and still the builtin."""
    from model.memory.checkpoint import CheckpointError
    from model.memory.cms import CMSError
    from model.sleep.consolidation import EmptyPromptBufferError
    from model.data.stream import DataError
    from model.errors import UserError
    from model.io import BusyError
    from model.sleep.rehearsal import RehearsalError

    for cls in (ConfigError, DataError, CheckpointError, CMSError, RehearsalError, EmptyPromptBufferError):
        assert issubclass(cls, UserError) and issubclass(cls, ValueError), cls
    assert issubclass(BusyError, UserError) and issubclass(BusyError, RuntimeError)
