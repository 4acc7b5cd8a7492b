"""Using a trained state: predict and generate as evaluation answers, and the Hugging Face export's round trip."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer, dynamic_module_utils

from model.config import load_params
from model.decoding.sampling import sample_continuations
from model.memory.checkpoint import CheckpointError, open_memory_model, read_manifest, save_state
from model.memory.prototypes import learn_prototypes
from model.memory.routed import period_view, routed_classify, routed_periods
from model.memory.wake import best_labels, label_scores
from model.serving.export import EXPORT_MANIFEST, ExportError, export_model, verify_export
from model.serving.serving import ServingError, TrainedModel, load_state, state_labels

ALARMS = ["set an alarm for seven", "wake me up at six", "alarm at noon please", "set alarm tomorrow"]
MONEY = ["what is my balance", "transfer money to savings", "how much money do i have", "send money to my account"]
PLAN = {"0": ["alarm", "wake_up"], "1": ["balance", "transfer"]}
PARAMS = {
    "model": {"source": "tiny"},
    "cms": {"top_layers": 2, "levels": [
        {"name": "fast", "chunk_size": 1, "lr": 0.01, "n_experts": 3, "d_low": 8, "top_k": 2},
        {"name": "slow", "chunk_size": 4, "lr": 0.01, "n_experts": 3, "d_low": 8, "top_k": 2},
    ]},
    "wake": {"max_length": 32, "eval_batch_size": 8},
    "sampling": {"batch_size": 4},
}


def _perturb(cms, level: int, slots: list[int], gen: torch.Generator, scale_a: float = 1.0) -> None:
    """Nonzero B and routers (and a stronger A) for some experts, so they change the answers."""
    with torch.no_grad():
        for bank in cms.banks(level):
            for s in slots:
                bank.B[s].normal_(0, 0.5, generator=gen)
                bank.router[s].normal_(0, 0.5, generator=gen)
                bank.A[s].mul_(scale_a)


@pytest.fixture(scope="module", params=["cosine", "mahalanobis"])
def project(tmp_path_factory, request) -> Path:
    """params.yaml, the stream plan and a two-period state with prototype routing (state/sleep/period-1), by
    each metric: period 0's experts learned alarms, period 1's strong new fast expert money."""
    metric = request.param
    root = tmp_path_factory.mktemp(f"serving-{metric}")
    params = PARAMS | {"cms": PARAMS["cms"] | {"routing": {"metric": metric}}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    (root / "data/processed").mkdir(parents=True)
    (root / "data/processed/tasks.json").write_text(json.dumps(PLAN))
    params = load_params(root / "params.yaml")
    lm, cms, _ = open_memory_model(params, root)
    gen = torch.Generator().manual_seed(1)
    routing = params.cms.routing
    learn_prototypes(lm.model, lm.tokenizer, cms, [f"{t} ->" for t in ALARMS], 0, None, 2, 4, 32,
                     metric=routing.metric, shrinkage=routing.shrinkage, groups=["alarm", "wake_up"] * 2)
    for li in range(2):
        _perturb(cms, li, cms.active_slots(li), gen)
    cms.freeze(0, 0, reason="test")
    cms.begin_period(1)
    slot = cms.unlock(0, origin="test")
    _perturb(cms, 0, [slot], gen, scale_a=50.0)
    learn_prototypes(lm.model, lm.tokenizer, cms, [f"{t} ->" for t in MONEY], 1, None, 2, 4, 32,
                     metric=routing.metric, shrinkage=routing.shrinkage, groups=["balance", "transfer"] * 2)
    assert cms.prototypes.metric == metric
    save_state(cms, root / "state/sleep/period-1", metadata={"period": 1})
    return root


@pytest.fixture(scope="module")
def trained(project) -> TrainedModel:
    return load_state(1, project / "params.yaml")


def test_predict_ranks_labels_as_evaluation_classifies(trained):
    texts = ALARMS + MONEY
    assert trained.labels == ["alarm", "wake_up", "balance", "transfer"]  # the plan's tasks 0..1
    answers = trained.predict(texts, top_k=10)
    model, tok, wake = trained.loaded.model, trained.loaded.tokenizer, trained.params.wake
    pred, periods = routed_classify(model, tok, trained.cms, wake.template, texts, trained.labels,
                                    wake.eval_batch_size, wake.max_length)
    assert periods == [0] * 4 + [1] * 4  # routing is in play: each text answered by its period's experts
    unrouted = label_scores(model, tok, wake.template, texts, trained.labels, wake.eval_batch_size, wake.max_length)
    assert pred != best_labels(unrouted, trained.labels)
    assert [a[0][0] for a in answers] == pred
    for a in answers:
        assert len(a) == 4 and sorted(lab for lab, _ in a) == sorted(trained.labels)
        scores = [s for _, s in a]
        assert scores == sorted(scores, reverse=True) and sum(scores) == pytest.approx(1.0, abs=1e-5)
    top2 = trained.predict(texts[:2], labels=["balance", "alarm"], top_k=1)
    assert [len(a) for a in top2] == [1, 1] and {a[0][0] for a in top2} <= {"balance", "alarm"}
    assert trained.predict([], top_k=1) == []
    for bad in ([], ["alarm", "alarm"], [""]):
        with pytest.raises(ServingError, match="candidate labels"):
            trained.predict(texts, labels=bad)
    with pytest.raises(ServingError, match="more than max_length-1"):
        trained.predict(texts, labels=["alarm", "a very long label " * 10])


def test_generate_writes_in_the_view_of_each_prompts_period(trained):
    prompts = [ALARMS[0], MONEY[0]]
    out = trained.generate(prompts, max_new_tokens=6)
    assert out == trained.generate(prompts, max_new_tokens=6)  # greedy: deterministic
    model, tok = trained.loaded.model, trained.loaded.tokenizer
    assert routed_periods(model, tok, trained.cms, prompts, 8, 64) == [0, 1]
    with period_view(trained.cms, 0):
        old = sample_continuations(model, tok, prompts[:1], 1, 6, 0.0)[0].text
    assert out == [old, sample_continuations(model, tok, prompts[1:], 1, 6, 0.0)[0].text]
    with pytest.raises(ServingError, match="prompt '' encodes to no tokens"):
        trained.generate(["", "hello"])
    with pytest.raises(ServingError, match="max_new_tokens must be >= 1"):
        trained.generate(prompts, max_new_tokens=0)


def test_state_labels_come_from_the_state_or_the_plan_or_fail_clearly(project):
    params = load_params(project / "params.yaml")
    manifest = read_manifest(project / "state/sleep/period-1")
    assert state_labels({**manifest, "metadata": {"labels": ["a", "b"]}}, params, project) == ["a", "b"]
    assert state_labels({**manifest, "period": 0}, params, project) == ["alarm", "wake_up"]
    with pytest.raises(ServingError, match="tasks.json: has no task 2"):
        state_labels({**manifest, "period": 2}, params, project)
    with pytest.raises(ServingError, match=r"records no labels and .*tasks\.json does not exist"):
        state_labels(manifest, params, project / "elsewhere")


def test_a_missing_or_corrupt_state_is_a_checkpoint_error(project, tmp_path):
    with pytest.raises(CheckpointError, match="period-7: no such state directory"):
        load_state(7, project / "params.yaml")
    bad = tmp_path / "bad"
    shutil.copytree(project / "state/sleep/period-1", bad)
    data = bytearray((bad / "experts.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (bad / "experts.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="experts.safetensors: checksum mismatch"):
        load_state(bad, project / "params.yaml")


@pytest.fixture
def hf_modules(tmp_path, monkeypatch) -> None:
    """trust_remote_code copies the export's code into a temporary modules cache, not ~/.cache."""
    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "hf-modules"))


def test_export_round_trip_gives_the_memory_models_logits_and_greedy_text(trained, tmp_path, hf_modules):
    out = export_model(trained, tmp_path / "export")
    meta = verify_export(out)
    assert meta["period"] == 1 and meta["labels"] == trained.labels and meta["state"] == "state/sleep/period-1"
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    tok = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    model, cms = trained.loaded.model, trained.cms
    texts = ALARMS[:2] + MONEY[:2]
    periods = routed_periods(model, trained.loaded.tokenizer, cms, texts, 8, 64)
    assert periods == [0, 0, 1, 1]
    for text, period in zip(texts, periods):  # each input in its routed period's view
        ids = tok(text, return_tensors="pt").input_ids
        with torch.no_grad(), period_view(cms, period):
            want, got = model(ids).logits, hf(ids).logits
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)
    batch = tok(texts, return_tensors="pt", padding=True)  # right-padded: routing reads the real tokens only
    with torch.no_grad():
        logits = hf(**batch).logits
    for r, period in enumerate(periods):
        n = int(batch.attention_mask[r].sum())
        with torch.no_grad(), period_view(cms, period):
            alone = model(batch.input_ids[r : r + 1, :n]).logits[0]
        assert torch.allclose(logits[r, :n], alone, rtol=1e-4, atol=1e-4)  # padding's masked attention: float noise
    hf.config.lm_sleep_routing = "all"  # every expert on: the in-process model as it is
    ids = tok(ALARMS[0], return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-6)
    hf.config.lm_sleep_routing = "prototype"
    for text, want in zip(texts, trained.generate(texts, max_new_tokens=8)):
        ids = tok(text, return_tensors="pt").input_ids
        got = hf.generate(ids, max_new_tokens=8, do_sample=False)
        assert tok.decode(got[0, ids.shape[1]:], skip_special_tokens=True) == want


def test_export_replaces_only_an_earlier_export_and_a_failure_leaves_it_whole(trained, tmp_path, monkeypatch):
    out = export_model(trained, tmp_path / "export")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    export_model(trained, out)  # an export over an earlier one: the same bytes (a rerun after a crash ends alike)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="mine: exists and is not an lm-sleep export"):
        export_model(trained, mine)
    assert (mine / "notes.txt").read_text() == "keep me"
    import dataclasses

    from model.memory.prototypes import SENTENCE_LAYER

    kept = trained.cms.prototypes
    trained.cms.prototypes = dataclasses.replace(kept, layer=SENTENCE_LAYER)  # a state routed by the sentence model
    try:
        with pytest.raises(ExportError, match="routes by the sentence model's embedding"):
            export_model(trained, tmp_path / "sentence")
    finally:
        trained.cms.prototypes = kept
    assert not (tmp_path / "sentence").exists()

    def broken(*_args, **_kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(trained.loaded.tokenizer), "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        export_model(trained, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "mine"]  # no temporary left beside it
    assert (out / EXPORT_MANIFEST).is_file()
