"""The no-context QA grader: SQuAD normalisation, EM, token F1, semantic match, accuracy, CIs."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from model.evaluation.grading import (
    GradeResult,
    accuracy,
    bootstrap_ci95,
    exact_match,
    grade,
    mean_ci95,
    metric_values,
    normalize_answer,
    token_f1,
)
from model.sleep.rewards import SemanticJudge


@pytest.fixture(scope="module")
def judge() -> SemanticJudge:
    return SemanticJudge.load(threshold=0.8)


@dataclass
class RecordingJudge:
    """Stands in for SemanticJudge: fixed cosines, and a record of the pairs it was asked about."""

    cosines: list[float]
    threshold: float = 0.8
    asked: list[tuple[str, str]] = field(default_factory=list)

    def cosine(self, cands: Sequence[str], refs: Sequence[str]) -> list[float]:
        self.asked.extend(zip(cands, refs))
        return self.cosines[: len(cands)]


# normalisation, EM, F1


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("The Beatles.", "beatles"),
        ("  An apple,  a DAY!  ", "apple day"),
        ("theater and anthem", "theater and anthem"),  # articles only as whole words
        ("Age of Enlightenment", "age of enlightenment"),
        ("U.S.-based", "usbased"),  # punctuation is deleted, not replaced by a space
        ("the", ""),
        ("", ""),
    ],
)
def test_normalize_answer(raw: str, normalised: str) -> None:
    assert normalize_answer(raw) == normalised


def test_exact_match_ignores_case_punctuation_and_articles() -> None:
    assert exact_match("the Eiffel Tower!", "Eiffel tower") == 1.0
    assert exact_match("A  Baltic   German", "baltic german") == 1.0
    assert exact_match("Eiffel", "Eiffel Tower") == 0.0
    assert exact_match("1758", "in 1758") == 0.0


def test_token_f1_partial_overlap() -> None:
    # pred tokens: baltic germans of estonia (4); gold: baltic germans (2); 2 shared
    # precision 1/2, recall 1, F1 = 2 * 0.5 * 1 / 1.5 = 2/3
    assert token_f1("The Baltic Germans of Estonia", "Baltic Germans") == pytest.approx(2 / 3)
    # shared tokens are counted as multisets: red x1 and car x1 in common, P = R = 2/3
    assert token_f1("red red car", "red car car") == pytest.approx(2 / 3)
    # precision 1/1, recall 1/3: F1 = 2 * (1/3) / (4/3) = 1/2
    assert token_f1("Otrar", "the city of Otrar") == pytest.approx(0.5)


def test_token_f1_full_and_no_overlap() -> None:
    assert token_f1("The Eiffel Tower.", "eiffel tower") == 1.0
    assert token_f1("Paris", "London") == 0.0


def test_token_f1_empty_answers() -> None:
    assert token_f1("", "") == 1.0
    assert token_f1("the", "an") == 1.0  # both normalise to no tokens
    assert token_f1("", "Paris") == 0.0
    assert token_f1("Paris", "the") == 0.0


# grade and accuracy


def test_grade_without_judge() -> None:
    results = grade(["The Beatles", "Baltic Germans from Riga", "Paris"], ["beatles", "Baltic Germans", "London"])
    # "baltic germans from riga" vs "baltic germans": P = 2/4, R = 2/2, F1 = 2/3
    assert results == [GradeResult(1.0, 1.0, None), GradeResult(0.0, pytest.approx(2 / 3), None), GradeResult(0.0, 0.0, None)]
    assert accuracy(results, "em") == pytest.approx(1 / 3)
    assert accuracy(results, "f1") == pytest.approx((1.0 + 2 / 3 + 0.0) / 3)
    assert metric_values(results, "em") == [1.0, 0.0, 0.0]


def test_grade_asks_the_judge_only_about_non_exact_non_empty_answers() -> None:
    judge = RecordingJudge(cosines=[0.9, 0.3])
    results = grade(
        [" Germans from the Baltic ", "the", "Paris", "BEATLES"],
        ["Baltic Germans", "Otrar", "London", "The Beatles"],
        judge=judge,  # type: ignore[arg-type]
    )
    assert judge.asked == [("Germans from the Baltic", "Baltic Germans"), ("Paris", "London")]
    assert [r.semantic for r in results] == [1.0, 0.0, 0.0, 1.0]
    assert [r.em for r in results] == [0.0, 0.0, 0.0, 1.0]
    assert accuracy(results, "semantic") == 0.5


def test_grade_threshold_overrides_the_judges() -> None:
    preds, golds = ["Germans from the Baltic", "Paris"], ["Baltic Germans", "London"]
    strict = grade(preds, golds, judge=RecordingJudge(cosines=[0.9, 0.3]), threshold=0.95)  # type: ignore[arg-type]
    loose = grade(preds, golds, judge=RecordingJudge(cosines=[0.9, 0.3]), threshold=0.2)  # type: ignore[arg-type]
    assert [r.semantic for r in strict] == [0.0, 0.0]
    assert [r.semantic for r in loose] == [1.0, 1.0]


def test_grade_with_minilm(judge: SemanticJudge) -> None:
    results = grade(
        ["Germans from the Baltic", "Paris", "", "the Beatles."],
        ["Baltic Germans", "London", "Paris", "Beatles"],
        judge=judge,
    )
    assert [r.semantic for r in results] == [1.0, 0.0, 0.0, 1.0]
    assert [r.em for r in results] == [0.0, 0.0, 0.0, 1.0]


def test_grade_and_accuracy_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="2 predictions but 1 reference"):
        grade(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no judge"):
        grade(["a"], ["a"], threshold=0.5)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        grade(["a"], ["b"], judge=RecordingJudge(cosines=[0.0]), threshold=2.0)  # type: ignore[arg-type]
    results = grade(["a"], ["a"])
    with pytest.raises(ValueError, match="needs results graded with a judge"):
        accuracy(results, "semantic")
    with pytest.raises(ValueError, match="unknown metric 'bleu'"):
        accuracy(results, "bleu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no graded answers"):
        accuracy([], "em")


# confidence intervals


def test_mean_ci95_known_values() -> None:
    # mean 0.75; sample std sqrt((3 * 0.25^2 + 0.75^2) / 3) = 0.5; half width 1.96 * 0.5 / 2 = 0.49
    mean, low, high = mean_ci95([1.0, 0.0, 1.0, 1.0])
    assert (mean, low, high) == pytest.approx((0.75, 0.26, 1.24))
    mean, low, high = mean_ci95([2.0, 4.0, 6.0, 8.0, 10.0])
    half = 1.96 * math.sqrt(10.0) / math.sqrt(5)  # sample variance 10
    assert (mean, low, high) == pytest.approx((6.0, 6.0 - half, 6.0 + half))


def test_mean_ci95_degenerate_cases() -> None:
    assert mean_ci95([0.3]) == (0.3, 0.3, 0.3)
    assert mean_ci95([1.0, 1.0, 1.0]) == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="at least one value"):
        mean_ci95([])
    with pytest.raises(ValueError, match="finite"):
        mean_ci95([1.0, float("nan")])


def test_bootstrap_ci95_contains_the_mean_and_is_seeded() -> None:
    values = [1.0] * 7 + [0.0] * 13 + [0.5, 0.25]
    mean, low, high = bootstrap_ci95(values)
    assert mean == pytest.approx(sum(values) / len(values))
    assert min(values) <= low < mean < high <= max(values)
    assert bootstrap_ci95(values) == (mean, low, high)
    assert bootstrap_ci95(values, seed=1) != (mean, low, high)


def test_bootstrap_agrees_with_the_normal_interval_for_many_values() -> None:
    values = [1.0, 0.0] * 200
    _, n_low, n_high = mean_ci95(values)
    _, b_low, b_high = bootstrap_ci95(values, n_boot=4000)
    assert b_low == pytest.approx(n_low, abs=0.01)
    assert b_high == pytest.approx(n_high, abs=0.01)


def test_bootstrap_degenerate_cases() -> None:
    assert bootstrap_ci95([0.4, 0.4, 0.4]) == pytest.approx((0.4, 0.4, 0.4))
    assert bootstrap_ci95([0.7]) == pytest.approx((0.7, 0.7, 0.7))
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_ci95([1.0, 0.0], n_boot=0)
    with pytest.raises(ValueError, match="at least one value"):
        bootstrap_ci95([])
