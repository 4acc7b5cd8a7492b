"""Prototype routing: each period's inputs leave prototypes; an input is answered by the experts of its period."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from model.memory.checkpoint import CheckpointError, load_state, save_state
from model.memory.cms import CMSError
from model.memory.merging import fit_groups, gated_expert_output, merge_pair
from model.memory.prototypes import (
    MAHALANOBIS_KEYS,
    Prototypes,
    add_period,
    compact,
    feature_layer,
    group_centroids,
    kmeans,
    learn_prototypes,
    route,
    sequence_features,
    shared_covariance,
    spherical_kmeans,
    view_class,
    whitening,
)
from model.memory.routed import period_view, routed_classify
from model.memory.wake import best_labels, label_scores
from tests.model.helpers import logits, make_nonzero, tiny_cms_config, tiny_with_cms, toy_batch

ALARMS = ["please set an alarm now", "wake me up at seven", "alarm for six please", "set my alarm for nine"]
MONEY = ["what is my balance", "how much money do I have", "show my bank account", "money left in savings"]
TEMPLATE = "{text} -> {label}"


def _clusters(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centre = torch.zeros(2, 16)
    centre[0, 0], centre[1, 1] = 5.0, 5.0
    x = torch.cat([centre[0] + 0.3 * torch.randn(20, 16, generator=g), centre[1] + 0.3 * torch.randn(20, 16, generator=g)])
    return x, torch.tensor([0] * 20 + [1] * 20)


def test_spherical_kmeans_gives_unit_centroids_that_separate_clusters():
    x, truth = _clusters()
    x = F.normalize(x, dim=1)
    c = spherical_kmeans(x, 2, seed=0)
    assert c.shape == (2, 16) and torch.allclose(c.norm(dim=1), torch.ones(2), atol=1e-5)
    assign = (x @ c.T).argmax(1)
    assert len(set(assign[truth == 0].tolist())) == 1 and len(set(assign[truth == 1].tolist())) == 1
    assert assign[0] != assign[-1]
    assert spherical_kmeans(x[:3], 8).shape == (3, 16)  # k is cut to the number of points


def test_route_names_the_period_of_the_nearest_prototype_and_a_period_can_be_replaced():
    x, truth = _clusters()
    protos = add_period(None, x[truth == 0], period=0, k=3, layer=1)
    protos = add_period(protos, x[truth == 1], period=1, k=3, layer=1)
    assert protos.centroids.shape == (6, 16) and protos.periods.tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.equal(route(protos, x), truth)
    again = add_period(protos, x[truth == 1], period=1, k=2, layer=1)  # a rerun of period 1 replaces its prototypes
    assert again.periods.tolist() == [0, 0, 0, 1, 1] and torch.equal(route(again, x), truth)
    with pytest.raises(CMSError, match="feature_layer"):
        add_period(protos, x, period=2, k=2, layer=0)


def _elongated(seed: int = 0, n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    """Two periods whose inputs differ only along a quiet direction (feature 1, spread 0.1, means 0.6 apart),
    while a loud direction every period shares (feature 0, spread 3) dominates the angle between them."""
    g = torch.Generator().manual_seed(seed)
    x = 0.05 * torch.randn(2 * n, 16, generator=g)
    x[:, 0] += 3.0 * torch.randn(2 * n, generator=g)
    x[:, 1] += 0.1 * torch.randn(2 * n, generator=g) + torch.tensor([-0.3] * n + [0.3] * n)
    x[:, 2] += 2.0  # every input sits off the origin, as hidden states do
    return x, torch.tensor([0] * n + [1] * n)


def test_mahalanobis_routing_finds_the_period_that_a_quiet_direction_tells_apart_and_cosine_does_not():
    x, truth = _elongated()
    test, test_truth = _elongated(seed=1)
    first, second = (truth == 0), (truth == 1)
    scores = {}
    for metric in ("cosine", "mahalanobis"):
        protos = add_period(None, x[first], 0, k=3, layer=1, metric=metric, shrinkage=0.1)
        protos = add_period(protos, x[second], 1, k=3, layer=1, metric=metric)
        assert protos.metric == metric
        scores[metric] = float((route(protos, test) == test_truth).float().mean())
    assert scores["mahalanobis"] >= 0.95 and scores["cosine"] <= 0.8, scores


def test_pooled_scatter_and_shrinkage_are_what_the_route_measures_with():
    x, truth = _elongated()
    groups = ["a" if i % 2 else "b" for i in range(20)]
    protos = add_period(None, x[truth == 0][:20], 0, k=2, layer=1, metric="mahalanobis", shrinkage=0.3, groups=groups)
    z = F.normalize((x[truth == 0][:20] - protos.mean) / protos.scale, dim=1)
    cents, resid = group_centroids(z, groups, 2, seed=0)
    assert protos.centroids.shape == (2, 16) and torch.allclose(protos.centroids, cents)  # one per label, in order
    assert torch.allclose(cents[0], z[0::2].mean(0), atol=1e-6)  # "b" comes first
    assert torch.allclose(resid[0::2].sum(0), torch.zeros(16), atol=1e-5)
    assert protos.count == 20 and torch.allclose(protos.scatter, resid.double().T @ resid.double())
    cov = shared_covariance(protos.scatter, protos.count, 0.3)
    w = protos.whiten()
    assert torch.allclose(w.double() @ cov @ w.double().T, torch.eye(16, dtype=torch.float64), atol=1e-4)
    assert torch.allclose(shared_covariance(protos.scatter, protos.count, 1.0),
                          (protos.scatter.trace() / 20 / 16) * torch.eye(16, dtype=torch.float64))
    more = add_period(protos, x[truth == 1], 1, k=2, layer=1, metric="mahalanobis", groups=[None] * 40)
    assert more.count == 60 and more.pooled_periods.tolist() == [0, 1] and more.centroids.shape == (4, 16)
    assert more.shrinkage == 0.3  # the first period fixes it, as it fixes the standardisation
    unlabelled = F.normalize((x[truth == 1] - protos.mean) / protos.scale, dim=1)
    c, assign = kmeans(unlabelled, 2, seed=0)
    assert torch.allclose(more.centroids[2:], c) and torch.allclose(
        more.scatter - protos.scatter, (unlabelled - c[assign]).double().T @ (unlabelled - c[assign]).double(), atol=1e-8)
    with pytest.raises(CMSError, match="period 1: its inputs are already in the routing covariance"):
        add_period(more, x[truth == 1], 1, k=2, layer=1, metric="mahalanobis")
    with pytest.raises(CMSError, match="cms.routing.metric is cosine but the state's prototypes were made with mahalanobis"):
        add_period(more, x[truth == 1], 2, k=2, layer=1, metric="cosine")
    with pytest.raises(ValueError, match="3 groups for 40 features"):
        add_period(more, x[truth == 1], 2, k=2, layer=1, metric="mahalanobis", groups=["a"] * 3)
    few = add_period(None, x[:6], 0, k=2, layer=1, metric="mahalanobis", shrinkage=0.3, groups=["a"] * 6)
    with pytest.raises(torch.linalg.LinAlgError):  # no shrinkage and fewer inputs than features: singular
        whitening(shared_covariance(few.scatter, few.count, 0.0))
    assert torch.isfinite(few.whiten()).all()  # which is why params.yaml's shrinkage must be > 0


def test_mahalanobis_prototypes_survive_a_checkpoint_and_an_incomplete_set_is_refused(tmp_path):
    lm, cms = tiny_with_cms()
    learn_prototypes(lm.model, lm.tokenizer, cms, ALARMS + MONEY, 0, None, 2, 4, 32, metric="mahalanobis",
                     shrinkage=0.4, groups=["alarm"] * 4 + ["money"] * 4)
    save_state(cms, tmp_path / "s")
    _, fresh = tiny_with_cms()
    load_state(fresh, tmp_path / "s")
    p, q = cms.prototypes, fresh.prototypes
    assert q.metric == "mahalanobis" and q.count == 8 and q.shrinkage == pytest.approx(0.4)
    assert torch.equal(q.scatter, p.scatter) and torch.equal(q.pooled_periods, p.pooled_periods)
    assert torch.equal(q.whiten(), p.whiten())

    from safetensors.torch import load_file, save_file
    from model.io import sha256_file

    tensors = load_file(str(tmp_path / "s/experts.safetensors"))
    del tensors[MAHALANOBIS_KEYS[1]]
    save_file(tensors, str(tmp_path / "s/experts.safetensors"))
    manifest = json.loads((tmp_path / "s/manifest.json").read_text())
    manifest["files"]["experts.safetensors"] = sha256_file(tmp_path / "s/experts.safetensors")
    (tmp_path / "s/manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="experts.safetensors: routing tensors \\['routing.count'\\] missing"):
        load_state(fresh, tmp_path / "s")


def test_features_come_from_below_the_memory_so_experts_never_move_them():
    lm, cms = tiny_with_cms()
    layer = feature_layer(cms, None)
    assert layer == 1 <= cms.layer_ids[0]
    before = sequence_features(lm.model, lm.tokenizer, ALARMS + MONEY, layer, 3, 32)
    make_nonzero(cms, 0)
    after = sequence_features(lm.model, lm.tokenizer, ALARMS + MONEY, layer, 3, 32)
    assert before.shape == (8, lm.model.config.hidden_size) and torch.allclose(before, after)
    alone = sequence_features(lm.model, lm.tokenizer, ALARMS[:1], layer, 1, 32)
    assert torch.allclose(alone[0], before[0], atol=1e-5)  # padding in a batch does not change a feature
    with pytest.raises(CMSError, match="cms.routing.feature_layer"):
        feature_layer(cms, cms.layer_ids[0] + 1)


def test_period_view_fires_only_experts_of_earlier_periods():
    lm, cms = tiny_with_cms()
    batch = toy_batch(lm)
    make_nonzero(cms, 0)
    base_fast = logits(lm, batch)
    cms.begin_period(1)
    slot = cms.unlock(0, origin="test")
    assert cms.experts[0][slot].period == 1 and cms.experts[0][0].period == 1  # writable experts learn period 1 now
    cms.freeze(0, 0, reason="test")
    cms.experts[0][0].period = 0
    make_nonzero(cms, 0, seed=3)
    both = logits(lm, batch)
    with period_view(cms, 0):
        only_old = logits(lm, batch)
    with cms.levels_masked([], hidden={0: [slot]}):
        hidden_new = logits(lm, batch)
    with period_view(cms, 1):
        assert torch.equal(logits(lm, batch), both)
    assert torch.equal(only_old, hidden_new) and not torch.allclose(only_old, both)
    assert not torch.allclose(base_fast, both)
    cms.begin_period(2)
    assert cms.experts[0][0].period == 0 and cms.experts[0][slot].period == 2  # frozen experts keep their period


def test_routed_classify_answers_each_input_with_its_periods_experts():
    lm, cms = tiny_with_cms()
    labels = ["alarm", "balance"]
    prompts = lambda texts: [f"{t} ->" for t in texts]  # noqa: E731
    learn_prototypes(lm.model, lm.tokenizer, cms, prompts(ALARMS), 0, None, 2, 4, 32)
    make_nonzero(cms, 0, seed=1)
    cms.freeze(0, 0, reason="test")
    cms.begin_period(1)
    slot = cms.unlock(0, origin="test")
    make_nonzero(cms, 0, seed=7)
    with torch.no_grad():  # a strong new expert: it changes the answers wherever it fires
        for bank in cms.banks(0):
            bank.A[slot].mul_(100)
    learn_prototypes(lm.model, lm.tokenizer, cms, prompts(MONEY), 1, None, 2, 4, 32)
    pred, periods = routed_classify(lm.model, lm.tokenizer, cms, TEMPLATE, ALARMS + MONEY, labels, 8, 32)
    assert periods == [0] * 4 + [1] * 4  # the training inputs route to their own period

    def unrouted(texts: list[str]) -> list[str]:  # every active expert on every input
        return best_labels(label_scores(lm.model, lm.tokenizer, TEMPLATE, texts, labels, 8, 32), labels)

    with cms.levels_masked([], hidden={0: [slot]}):
        old = unrouted(ALARMS)
    new = unrouted(MONEY)
    assert pred == old + new
    assert old != unrouted(ALARMS)  # unrouted, the new expert overrides
    cms.prototypes = None  # no prototypes: every expert answers every input
    assert routed_classify(lm.model, lm.tokenizer, cms, TEMPLATE, ALARMS, labels, 8, 32) == (unrouted(ALARMS), None)


def test_prototypes_and_periods_survive_a_checkpoint_and_bad_ones_are_refused(tmp_path):
    lm, cms = tiny_with_cms()
    learn_prototypes(lm.model, lm.tokenizer, cms, ALARMS, 0, None, 2, 4, 32)
    cms.begin_period(1)
    cms.unlock(1, origin="test")
    save_state(cms, tmp_path / "s")
    _, fresh = tiny_with_cms()
    load_state(fresh, tmp_path / "s")
    assert fresh.period == 1 and [e.period for e in fresh.experts[1]] == [e.period for e in cms.experts[1]]
    for name in ("mean", "scale", "centroids", "periods"):
        assert torch.equal(getattr(fresh.prototypes, name), getattr(cms.prototypes, name))
    assert fresh.prototypes.layer == cms.prototypes.layer

    _, other = tiny_with_cms()  # a state without prototypes (routing off) loads as "no routing"
    other.prototypes = None
    save_state(other, tmp_path / "plain")
    load_state(fresh, tmp_path / "plain")
    assert fresh.prototypes is None

    from safetensors.torch import load_file, save_file
    from model.io import sha256_file

    bad = tmp_path / "s"
    tensors = load_file(str(bad / "experts.safetensors"))
    tensors["routing.periods"] = tensors["routing.periods"][:1]
    save_file(tensors, str(bad / "experts.safetensors"))
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["files"]["experts.safetensors"] = sha256_file(bad / "experts.safetensors")
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="experts.safetensors.*inconsistent shapes"):
        load_state(fresh, bad)


def test_merged_expert_answers_for_the_older_period():
    lm, cms = tiny_with_cms(cfg=tiny_cms_config(n_experts=3, top_k=3))
    for period in (0, 1):
        cms.begin_period(period)
        slot = cms.unlock(1, origin=f"consolidation:test-{period}")
        cms.freeze(1, slot, reason="test")
    make_nonzero(cms, 1)
    merge_pair(lm.model, lm.tokenizer, cms, 1, ALARMS, 32, steps=2, lr=1e-2, seed=0)
    periods = sorted(e.period for e in cms.experts[1] if e.active)
    assert periods[0] == 0 and len(periods) == 2


def _two_periods_of_slow_experts():
    """Period 0's (ALARMS) and period 1's (MONEY) prototypes, and a read-only slow expert of each (slots 1, 2)."""
    lm, cms = tiny_with_cms(cfg=tiny_cms_config(n_experts=3, top_k=3))
    for period, texts in ((0, ALARMS), (1, MONEY)):
        cms.begin_period(period)
        slot = cms.unlock(1, origin=f"consolidation:test-{period}")
        cms.freeze(1, slot, reason="test")
        learn_prototypes(lm.model, lm.tokenizer, cms, [f"{t} ->" for t in texts], period, None, 2, 4, 32)
    make_nonzero(cms, 1, seed=5)
    return lm, cms


def test_a_merge_in_view_fits_each_periods_inputs_to_the_experts_that_answer_them():
    """consolidation.merge_in_view: period 0's inputs never saw period 1's expert, so the merged expert is fitted
    to period 0's expert alone on them, and to both on period 1's; without it, to both everywhere."""
    prompts = [f"{t} ->" for t in ALARMS + MONEY]
    lm, cms = _two_periods_of_slow_experts()
    assert [slots for _, slots in fit_groups(lm.model, lm.tokenizer, cms, 1, (1, 2), prompts, 32, False)] == [[1, 2]]
    groups = fit_groups(lm.model, lm.tokenizer, cms, 1, (1, 2), prompts, 32, True)
    assert [slots for _, slots in groups] == [[1], [1, 2]]
    n_tokens = [g[0][0].shape[0] for g in groups]
    assert sum(n_tokens) == fit_groups(lm.model, lm.tokenizer, cms, 1, (1, 2), prompts, 32, False)[0][0][0].shape[0]
    (old_inputs, _), (new_inputs, _) = groups
    with period_view(cms, 0):  # period 0's inputs are read as the model answers them: without period 1's expert
        assert all(torch.allclose(a, b) for a, b in zip(old_inputs, fit_groups(
            lm.model, lm.tokenizer, cms, 1, (1, 2), prompts[:4], 32, False)[0][0]))
    bank_targets = []
    for bank, h in zip(cms.banks(1), old_inputs):
        bank_targets.append((gated_expert_output(bank, h, [1]).detach(), gated_expert_output(bank, h, [1, 2]).detach()))
    merge_pair(lm.model, lm.tokenizer, cms, 1, prompts, 32, steps=300, lr=1e-2, seed=0, in_view=True)
    for bank, h, (alone, both) in zip(cms.banks(1), old_inputs, bank_targets):
        fit = gated_expert_output(bank, h, [1])
        assert (fit - alone).norm() < 0.5 * (fit - both).norm()  # closer to what period 0's inputs saw


def test_nested_hiding_adds_to_what_is_hidden_and_restores_it_exactly():
    lm, cms = tiny_with_cms(cfg=tiny_cms_config(n_experts=3, top_k=3))
    for _ in range(2):
        cms.unlock(1, origin="test")
    with cms.levels_masked([], hidden={1: [1]}):
        with cms.levels_masked([], hidden={1: [2]}):
            assert all(bank.slots == [0] for bank in cms.banks(1))
        assert all(bank.slots == [0, 2] for bank in cms.banks(1))  # the outer hiding holds after the inner one
    assert all(bank.slots == [0, 1, 2] for bank in cms.banks(1))


def test_periods_that_see_the_same_experts_share_k_prototypes_and_route_alike():
    """Once a merge leaves no expert between two periods, they share one view; compaction keeps K centroids for
    the pair (labelled with the later period), so the prototypes stay bounded over a long life, and every input
    is answered with the same experts as before."""
    lm, cms = tiny_with_cms(cfg=tiny_cms_config(n_experts=4, top_k=4))
    g = torch.Generator().manual_seed(0)
    feats = {p: 0.3 * torch.randn(12, 16, generator=g) + 5.0 * F.one_hot(torch.tensor(p), 16) for p in range(4)}
    protos = Prototypes(1, torch.zeros(16), torch.ones(16), torch.empty(0, 16), torch.empty(0, dtype=torch.long))
    for period in range(3):  # each sleep leaves a frozen expert of its period
        cms.begin_period(period)
        protos = add_period(protos, feats[period], period, k=3, layer=1)
        cms.freeze(1, cms.unlock(1, origin=f"consolidation:test-{period}"), reason="test")
    cms.begin_period(3)
    protos = add_period(protos, feats[3], 3, k=3, layer=1)
    assert [view_class(cms, p) for p in range(4)] == [1, 2, 3, 4]  # each period its own experts: its own view
    assert compact(protos, cms, k=3) is protos
    x = torch.cat([feats[p] for p in range(4)])
    for e in cms.experts[1]:  # a merge of periods 0 and 1's experts: the merged one answers for period 0
        if e.active and e.period == 1:
            e.active = False
    assert [view_class(cms, p) for p in range(4)] == [1, 1, 2, 3]
    small = compact(protos, cms, k=3)
    assert small.periods.tolist() == [1] * 3 + [2] * 3 + [3] * 3 and small.centroids.shape == (9, 16)
    assert torch.allclose(small.centroids.norm(dim=1), torch.ones(9), atol=1e-5)
    after = [view_class(cms, int(r)) for r in route(small, x)]
    truth = [view_class(cms, p) for p in range(4) for _ in range(12)]
    assert after == truth  # every input still finds the experts its own period sees
    assert compact(small, cms, k=3) is small  # a compact set stays as it is


def test_mahalanobis_compaction_keeps_the_pooled_covariance_and_k_centroids_per_view():
    lm, cms = tiny_with_cms(cfg=tiny_cms_config(n_experts=4, top_k=4))
    g = torch.Generator().manual_seed(0)
    feats = {p: 0.3 * torch.randn(12, 16, generator=g) + 5.0 * F.one_hot(torch.tensor(p), 16) for p in range(3)}
    protos = None
    for period in range(3):
        cms.begin_period(period)
        protos = add_period(protos, feats[period], period, k=2, layer=1, metric="mahalanobis",
                            groups=[f"{period}-{i % 3}" for i in range(12)])  # three labels a period
        cms.freeze(1, cms.unlock(1, origin=f"consolidation:test-{period}"), reason="test")
    assert protos.centroids.shape == (9, 16)
    for e in cms.experts[1]:  # periods 0 and 1 now share a view
        if e.active and e.period == 1:
            e.active = False
    small = compact(protos, cms, k=2)
    assert small.periods.tolist() == [1, 1, 2, 2, 2] and small.metric == "mahalanobis"
    assert small.scatter is protos.scatter and small.count == protos.count == 36
    x = torch.cat([feats[p] for p in range(3)])
    assert [view_class(cms, int(r)) for r in route(small, x)] == [1] * 24 + [2] * 12


def test_sentence_feature_routes_each_input_to_its_period_and_the_state_keeps_it(tmp_path):
    """``cms.routing.feature: sentence``: prototypes of the sentence model's embedding (not a decoder layer's): the
    texts of two periods go to their own period, the feature survives a checkpoint, and a state made with one
    feature refuses the other."""
    from model.memory.prototypes import SENTENCE_LAYER, sentence_features
    from model.memory.routed import routed_periods

    lm, cms = tiny_with_cms()
    prompts = lambda texts: [f"{t} ->" for t in texts]  # noqa: E731
    alarms = [*ALARMS, "set an alarm for noon", "i need an alarm at five"]
    money = [*MONEY, "how much is in my account", "my balance please"]
    kw = dict(metric="mahalanobis", shrinkage=0.5, feature="sentence")
    learn_prototypes(lm.model, lm.tokenizer, cms, prompts(alarms[:4]), 0, None, 2, 4, 32,
                     groups=["alarm"] * 4, **kw)
    cms.begin_period(1)
    learn_prototypes(lm.model, lm.tokenizer, cms, prompts(money[:4]), 1, None, 2, 4, 32,
                     groups=["balance"] * 4, **kw)
    assert cms.prototypes.layer == SENTENCE_LAYER and cms.prototypes.centroids.shape[1] == 384
    held_out = prompts(alarms[4:] + money[4:])
    assert routed_periods(lm.model, lm.tokenizer, cms, held_out, 4, 32) == [0, 0, 1, 1]
    feats = sentence_features(held_out, 2)
    assert feats.shape == (4, 384) and torch.allclose(feats.norm(dim=1), torch.ones(4), atol=1e-4)
    # the same text, the same feature, whatever else is in its batch
    assert torch.allclose(sentence_features(held_out[:1], 1)[0], feats[0], atol=1e-5)

    save_state(cms, tmp_path / "s")
    _, fresh = tiny_with_cms()
    load_state(fresh, tmp_path / "s")
    assert fresh.prototypes.layer == SENTENCE_LAYER
    assert routed_periods(lm.model, lm.tokenizer, fresh, held_out, 4, 32) == [0, 0, 1, 1]
    with pytest.raises(CMSError, match="route by decoder layer 1's input but the state's prototypes were made with "
                                       "the sentence model's embedding"):
        learn_prototypes(lm.model, lm.tokenizer, fresh, prompts(alarms), 2, None, 2, 4, 32,
                         metric="mahalanobis", groups=["alarm"] * len(alarms))
    with pytest.raises(CMSError, match="feature 'sentence' reads no decoder layer"):
        feature_layer(cms, 1, "sentence")
