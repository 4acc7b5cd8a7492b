"""Tiny models and configs shared by the model tests."""

from __future__ import annotations

import torch

from model.config import CMSConfig, LevelConfig
from model.decoding.forward import Batch
from model.decoding.loading import LoadedModel, tiny_model
from model.memory.cms import ContinuumMemory, attach_cms
from model.memory.wake import encode


def tiny_cms_config(**level_overrides) -> CMSConfig:
    common = {"lr": 1e-2, "n_experts": 3, "d_low": 8, "top_k": 2, **level_overrides}
    levels = [
        LevelConfig(name="fast", chunk_size=1, **common),
        LevelConfig(name="slow", chunk_size=4, **common),
    ]
    return CMSConfig(top_layers=2, levels=levels)


def tiny_with_cms(seed: int = 0, cfg: CMSConfig | None = None) -> tuple[LoadedModel, ContinuumMemory]:
    lm = tiny_model(seed=seed)
    return lm, attach_cms(lm.model, cfg or tiny_cms_config(), seed=seed)


def toy_batch(lm: LoadedModel) -> Batch:
    return encode(lm.tokenizer, ["what is my balance ->", "book a table for two ->"], ["balance", "restaurant"], 32)


def logits(lm: LoadedModel, batch: Batch) -> torch.Tensor:
    with torch.no_grad():
        return lm.model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits


def make_nonzero(cms: ContinuumMemory, level: int, seed: int = 1) -> None:
    """Give every active expert of a level nonzero B, so it changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bank in cms.banks(level):
            for s in cms.active_slots(level):
                bank.B[s].normal_(0, 0.5, generator=g)
