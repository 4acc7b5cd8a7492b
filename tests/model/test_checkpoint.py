"""Save/load of the memory state: exact round trip, corruption refused, atomic writes."""

from __future__ import annotations

import json

import pytest
import torch

from model.memory.checkpoint import EXPERTS_FILE, MANIFEST_FILE, CheckpointError, load_state, save_state
from model.memory.optimizer import ChunkedOptimizer
from model.memory.wake import sft_loss
from tests.model.helpers import logits, tiny_cms_config, tiny_with_cms, toy_batch


def _trained(steps: int = 3):
    lm, cms = tiny_with_cms()
    opt = ChunkedOptimizer(cms)
    batch = toy_batch(lm)
    for _ in range(steps):
        sft_loss(lm.model, batch).backward()
        opt.step()
    return lm, cms, opt, batch


def test_round_trip_is_exact_including_mid_chunk_gradients(tmp_path):
    lm, cms, opt, batch = _trained(steps=3)  # slow level (C=4) has 3 steps of pending gradient
    cms.unlock(1, origin="consolidation:test")
    save_state(cms, tmp_path / "s", opt, metadata={"period": 7})
    lm2, cms2 = tiny_with_cms()
    opt2 = ChunkedOptimizer(cms2)
    manifest = load_state(cms2, tmp_path / "s", opt2)
    assert manifest["metadata"] == {"period": 7}
    torch.testing.assert_close(logits(lm2, batch), logits(lm, batch), rtol=0, atol=0)
    assert cms2.step == cms.step == 3
    assert cms2.active_slots(1) == cms.active_slots(1)
    assert cms2.experts[1][1].origin == "consolidation:test"
    # Continuing training from the loaded state matches continuing the original exactly.
    for m, c, o in ((lm, cms, opt), (lm2, cms2, opt2)):
        sft_loss(m.model, batch).backward()
        o.step()  # step 4: the slow level's chunk ends here
    for (n1, p1), (_, p2) in zip(cms.named_memory_parameters(), cms2.named_memory_parameters()):
        torch.testing.assert_close(p1, p2, rtol=0, atol=0, msg=n1)


def test_manifest_records_provenance_and_checksums(tmp_path):
    _, cms, opt, _ = _trained()
    save_state(cms, tmp_path / "s", opt)
    m = json.loads((tmp_path / "s" / MANIFEST_FILE).read_text())
    fast = m["levels"][0]
    assert fast["name"] == "fast" and fast["chunk_size"] == 1
    e0 = fast["experts"][0]
    assert e0["active"] and e0["origin"] == "init" and e0["unlocked_at_step"] == 0 and len(e0["sha256"]) == 64
    assert set(m["files"]) == {"experts.safetensors", "train.safetensors"}


def test_corrupted_weights_are_refused_and_model_untouched(tmp_path):
    lm, cms, opt, batch = _trained()
    save_state(cms, tmp_path / "s", opt)
    path = tmp_path / "s" / EXPERTS_FILE
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF
    path.write_bytes(bytes(raw))
    lm2, cms2 = tiny_with_cms()
    before = logits(lm2, batch)
    with pytest.raises(CheckpointError, match="experts.safetensors: checksum mismatch"):
        load_state(cms2, tmp_path / "s")
    torch.testing.assert_close(logits(lm2, batch), before, rtol=0, atol=0)


def test_tampered_expert_digest_is_refused_and_rolled_back(tmp_path):
    lm, cms, opt, batch = _trained()
    save_state(cms, tmp_path / "s", opt)
    mpath = tmp_path / "s" / MANIFEST_FILE
    m = json.loads(mpath.read_text())
    m["levels"][0]["experts"][0]["sha256"] = "0" * 64
    mpath.write_text(json.dumps(m))
    lm2, cms2 = tiny_with_cms()
    before = logits(lm2, batch)
    with pytest.raises(CheckpointError, match=r"levels\[0\]\.experts\[0\]\.sha256"):
        load_state(cms2, tmp_path / "s")
    torch.testing.assert_close(logits(lm2, batch), before, rtol=0, atol=0)


def test_layout_mismatch_and_missing_files(tmp_path):
    _, cms, opt, _ = _trained()
    save_state(cms, tmp_path / "s", opt)
    _, other = tiny_with_cms(cfg=tiny_cms_config(d_low=4))
    with pytest.raises(CheckpointError, match="d_low=8.*d_low=4"):
        load_state(other, tmp_path / "s")
    with pytest.raises(CheckpointError, match="manifest.json: missing"):
        load_state(cms, tmp_path / "nowhere")
    (tmp_path / "s" / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_state(cms, tmp_path / "s")


def test_failed_save_keeps_the_previous_state(tmp_path, monkeypatch):
    _, cms, opt, _ = _trained()
    save_state(cms, tmp_path / "s", opt, metadata={"v": 1})
    import model.memory.checkpoint as ck

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_state(cms, tmp_path / "s", opt, metadata={"v": 2})
    m = json.loads((tmp_path / "s" / MANIFEST_FILE).read_text())
    assert m["metadata"] == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # no temp dirs left


def _with_digest(state, name: str, data: bytes) -> None:
    """Replace a state file and fix its manifest digest, as a careless tool (or an attacker) would."""
    import hashlib

    (state / name).write_bytes(data)
    mpath = state / MANIFEST_FILE
    m = json.loads(mpath.read_text())
    m["files"][name] = hashlib.sha256(data).hexdigest()
    mpath.write_text(json.dumps(m))


@pytest.mark.parametrize(("case", "message"), [
    ("pickle", r"experts.safetensors: not a readable safetensors file"),
    ("truncated", r"experts.safetensors: not a readable safetensors file"),
    ("slot 9", r"levels\[0\]\.experts\[0\]\.slot' is 9: not a free slot of 0\.\.2"),
    ("twice", r"levels\[1\]\.experts\[1\]\.slot' is 0: not a free slot"),
    ("no origin", r"levels\[0\]\.experts\[0\]\.origin' missing"),
])
def test_a_damaged_state_is_one_error_naming_the_file_and_field(tmp_path, case, message):
    import pickle

    lm, cms, opt, batch = _trained()
    cms.unlock(1, origin="consolidation:test")
    state = tmp_path / "s"
    save_state(cms, state, opt)
    if case == "pickle":
        _with_digest(state, EXPERTS_FILE, pickle.dumps({"weights": [1, 2, 3]}))
    elif case == "truncated":
        _with_digest(state, EXPERTS_FILE, (state / EXPERTS_FILE).read_bytes()[:100])
    else:
        mpath = state / MANIFEST_FILE
        m = json.loads(mpath.read_text())
        if case == "slot 9":
            m["levels"][0]["experts"][0]["slot"] = 9
        elif case == "twice":
            m["levels"][1]["experts"][1]["slot"] = m["levels"][1]["experts"][0]["slot"]
        else:
            del m["levels"][0]["experts"][0]["origin"]
        mpath.write_text(json.dumps(m))
    lm2, cms2 = tiny_with_cms()
    before = logits(lm2, batch)
    with pytest.raises(CheckpointError, match=message) as err:
        load_state(cms2, state)
    assert "\n" not in str(err.value)
    torch.testing.assert_close(logits(lm2, batch), before, rtol=0, atol=0)


def _checked_project(tmp_path):
    """A params.yaml for the tiny model and a saved state of it with one trained step (state ``s``)."""
    import yaml

    from model.config import load_params
    from model.memory.checkpoint import open_memory_model

    (tmp_path / "params.yaml").write_text(yaml.safe_dump({
        "seed": 0, "model": {"source": "tiny"},
        "cms": {"top_layers": 2, "levels": [
            {"name": "fast", "chunk_size": 1, "lr": 0.05, "n_experts": 3, "d_low": 8, "top_k": 2},
            {"name": "slow", "chunk_size": 12, "lr": 0.02, "n_experts": 3, "d_low": 8, "top_k": 2}]},
    }))
    params = load_params(tmp_path / "params.yaml")
    lm, cms, opt = open_memory_model(params, tmp_path, None, with_optimizer=True)
    batch = toy_batch(lm)
    sft_loss(lm.model, batch).backward()
    opt.step()
    save_state(cms, tmp_path / "s", opt)
    return params, batch


def test_a_checked_state_is_opened_once_and_is_the_state_a_fresh_open_gives(tmp_path):
    from model.memory.checkpoint import check_state, open_memory_model

    params, batch = _checked_project(tmp_path)
    fresh, _, fresh_opt = open_memory_model(params, tmp_path, tmp_path / "s", with_optimizer=True)
    check_state(params, tmp_path, tmp_path / "s", "test")
    lm, cms, opt = open_memory_model(params, tmp_path, tmp_path / "s", with_optimizer=True)
    torch.testing.assert_close(logits(lm, batch), logits(fresh, batch), rtol=0, atol=0)
    assert opt is not None and cms.step == 1
    again, _, _ = open_memory_model(params, tmp_path, tmp_path / "s", with_optimizer=True)
    assert again.model is not lm.model  # handed out once: the next opening loads its own
    # The stage of the check gets the model the check opened, without the optimiser when it asks for none.
    check_state(params, tmp_path, tmp_path / "s", "test")
    lm2, _, opt2 = open_memory_model(params, tmp_path, tmp_path / "s")
    assert opt2 is None
    torch.testing.assert_close(logits(lm2, batch), logits(fresh, batch), rtol=0, atol=0)


def test_a_checked_state_is_not_handed_to_another_state_or_params(tmp_path):
    from model.config import load_params
    from model.memory.checkpoint import check_state, open_memory_model

    params, batch = _checked_project(tmp_path)
    check_state(params, tmp_path, tmp_path / "s", "test")
    fresh, _, _ = open_memory_model(params, tmp_path, None)  # another state (none): a model of its own
    held, _, _ = open_memory_model(params, tmp_path, tmp_path / "s")
    assert held.model is not fresh.model
    # Changed params (another seed) do not take the checked model either.
    check_state(params, tmp_path, tmp_path / "s", "test")
    other = load_params(tmp_path / "params.yaml").for_run({"seed": 3}, "test")
    lm, _, _ = open_memory_model(other, tmp_path, tmp_path / "s")
    lm2, _, _ = open_memory_model(params, tmp_path, tmp_path / "s")
    assert lm2.model is not lm.model
    # A state rewritten after the check (its manifest changed) is opened again, not taken from the check.
    check_state(params, tmp_path, tmp_path / "s", "test")
    lm3, cms3, opt3 = open_memory_model(params, tmp_path, tmp_path / "s", with_optimizer=True)
    cms3.unlock(1, origin="consolidation:test")
    save_state(cms3, tmp_path / "s", opt3)
    check_state(params, tmp_path, tmp_path / "s", "test")
    cms3.unlock(1, origin="consolidation:test2")
    save_state(cms3, tmp_path / "s", opt3)
    _, cms4, _ = open_memory_model(params, tmp_path, tmp_path / "s")
    assert len(cms4.active_slots(1)) == len(cms3.active_slots(1))
