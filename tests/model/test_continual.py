"""Continual-learning metrics on hand-computed accuracy matrices, and t confidence intervals."""

from __future__ import annotations

import math

import numpy as np
import pytest

from model.evaluation.continual import (
    accuracy_matrix,
    backward_transfer,
    earlier_tasks_accuracy,
    final_average_accuracy,
    forgetting,
    mean_ci,
    paired_difference_ci,
    t_cdf,
    t_quantile,
)

# Forgetting of task 0 uses its best earlier accuracy (0.9 after task 1), not R[0][0] = 0.5,
# so forgetting and -BWT differ here.
R3 = [
    [0.5, None, None],
    [0.9, 0.6, None],
    [0.7, 0.8, 0.9],
]


def test_accuracy_matrix_from_rows_with_json_keys():
    R = accuracy_matrix([{"0": 0.5}, {0: 0.9, "1": 0.6}, {"0": 0.7, "1": 0.8, "2": 0.9}], n_tasks=3)
    assert R == R3
    partial = accuracy_matrix([{0: 0.9}, {0: 0.6, 1: 0.8, 2: 0.1}], n_tasks=3)
    assert partial == [[0.9, None, None], [0.6, 0.8, 0.1]]  # j > i kept when given
    with pytest.raises(ValueError, match="outside"):
        accuracy_matrix([{3: 0.5}], n_tasks=3)
    with pytest.raises(ValueError, match="nan"):
        accuracy_matrix([{0: float("nan")}], n_tasks=1)
    with pytest.raises(ValueError, match="only 1 tasks"):
        accuracy_matrix([{0: 0.5}, {0: 0.5}], n_tasks=1)


def test_metrics_on_a_hand_computed_matrix():
    assert final_average_accuracy(R3) == pytest.approx((0.7 + 0.8 + 0.9) / 3)
    # task 0: max(0.5, 0.9) - 0.7 = 0.2; task 1: 0.6 - 0.8 = -0.2
    assert forgetting(R3) == pytest.approx(0.0)
    # (0.7 - 0.5 + 0.8 - 0.6) / 2
    assert backward_transfer(R3) == pytest.approx(0.2)


def test_classic_forgetting_is_positive_and_bwt_negative():
    R = [[0.9, None, None], [0.6, 0.8, None], [0.5, 0.7, 0.95]]
    assert final_average_accuracy(R) == pytest.approx((0.5 + 0.7 + 0.95) / 3)
    assert forgetting(R) == pytest.approx((0.4 + 0.1) / 2)
    assert backward_transfer(R) == pytest.approx((-0.4 - 0.1) / 2)


def test_negative_forgetting_and_positive_backward_transfer():
    R = [[0.5, None], [0.7, 0.9]]
    assert forgetting(R) == pytest.approx(-0.2)
    assert backward_transfer(R) == pytest.approx(0.2)
    assert final_average_accuracy(R) == pytest.approx(0.8)


def test_earlier_tasks_accuracy_is_where_they_end_whatever_they_reached():
    # task 0 learned badly and kept (0.5 -> 0.5), against learned well and half lost (0.9 -> 0.7):
    kept_low = [[0.5, None], [0.5, 0.9]]
    lost_high = [[0.9, None], [0.7, 0.9]]
    assert forgetting(kept_low) < forgetting(lost_high)  # forgetting ranks the poor learner first
    assert earlier_tasks_accuracy(kept_low) == pytest.approx(0.5)  # but it ends lower
    assert earlier_tasks_accuracy(lost_high) == pytest.approx(0.7)
    assert earlier_tasks_accuracy(R3) == pytest.approx((0.7 + 0.8) / 2)  # the last row without the last task
    assert earlier_tasks_accuracy([[0.8]]) is None  # one task: no earlier task
    partial = accuracy_matrix([{0: 0.9}, {0: 0.6, 1: 0.8}], n_tasks=3)
    assert earlier_tasks_accuracy(partial) == pytest.approx(0.6)  # two tasks learned of three


def test_single_task_and_partial_and_missing():
    assert (final_average_accuracy([[0.8]]), forgetting([[0.8]]), backward_transfer([[0.8]])) == (0.8, 0.0, 0.0)
    # Two of three tasks learned: unseen task 2 is not averaged.
    partial = accuracy_matrix([{0: 0.9}, {0: 0.6, 1: 0.8}], n_tasks=3)
    assert final_average_accuracy(partial) == pytest.approx(0.7)
    assert forgetting(partial) == pytest.approx(0.3)
    with pytest.raises(ValueError, match=r"R\[1\]\[0\]"):
        forgetting(accuracy_matrix([{0: 0.9}, {1: 0.8}], n_tasks=2))
    with pytest.raises(ValueError, match="empty"):
        final_average_accuracy([])


@pytest.mark.parametrize(
    "q, df, expected",
    [(0.975, 1, 12.7062), (0.975, 2, 4.3027), (0.975, 4, 2.7764), (0.975, 10, 2.2281),
     (0.975, 30, 2.0423), (0.995, 5, 4.0321), (0.95, 4, 2.1318), (0.975, 10**6, 1.9600)],
)
def test_t_quantile_matches_tables(q, df, expected):
    assert t_quantile(q, df) == pytest.approx(expected, abs=1e-4)
    assert t_quantile(1 - q, df) == pytest.approx(-expected, abs=1e-4)
    assert t_cdf(t_quantile(q, df), df) == pytest.approx(q, abs=1e-10)


def test_t_quantile_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in [1, 2, 3, 5, 9, 19, 29, 50, 200]:
        for q in [0.6, 0.9, 0.95, 0.975, 0.995]:
            assert t_quantile(q, df) == pytest.approx(stats.t.ppf(q, df), rel=1e-8)


def test_mean_ci_known_values_and_edge_cases():
    m, lo, hi = mean_ci([1.0, 2.0, 3.0])
    half = 4.302653 * 1.0 / math.sqrt(3)  # t(0.975, 2) * s / sqrt(n), s = 1
    assert (m, lo, hi) == pytest.approx((2.0, 2.0 - half, 2.0 + half), abs=1e-5)
    m90, lo90, hi90 = mean_ci([1.0, 2.0, 3.0], confidence=0.9)
    assert lo < lo90 < m90 < hi90 < hi
    one = mean_ci([0.7])
    assert one[0] == 0.7 and math.isnan(one[1]) and math.isnan(one[2])
    assert mean_ci([0.5, 0.5, 0.5]) == (0.5, 0.5, 0.5)
    for bad in ([], [1.0, float("inf")]):
        with pytest.raises(ValueError):
            mean_ci(bad)
    with pytest.raises(ValueError, match="confidence"):
        mean_ci([1.0, 2.0], confidence=95)


def test_mean_ci_covers_the_true_mean_at_its_level():
    rng = np.random.default_rng(0)
    draws = rng.normal(3.0, 2.0, size=(4000, 5))
    covered = 0
    for row in draws:
        _, lo, hi = mean_ci(row)
        covered += lo <= 3.0 <= hi
    assert covered / len(draws) == pytest.approx(0.95, abs=0.012)


def test_paired_difference_ci_removes_shared_seed_variance():
    a, b = [0.8, 0.82, 0.79], [0.7, 0.73, 0.68]
    m, lo, hi = paired_difference_ci(a, b)
    half = 4.302653 * 0.01 / math.sqrt(3)  # differences 0.10, 0.09, 0.11: s = 0.01
    assert (m, lo, hi) == pytest.approx((0.1, 0.1 - half, 0.1 + half), abs=1e-6)
    # Large seed effects shared by both methods: unpaired intervals overlap, the paired one excludes 0.
    seed_effect = np.array([0.2, 0.5, 0.35, 0.6, 0.25])
    a2, b2 = seed_effect + 0.05 + np.array([0.0, 0.01, -0.01, 0.005, 0.0]), seed_effect
    _, lo_a, _ = mean_ci(a2)
    _, _, hi_b = mean_ci(b2)
    assert lo_a < hi_b
    _, lo_d, _ = paired_difference_ci(a2, b2)
    assert lo_d > 0
    with pytest.raises(ValueError, match="equal lengths"):
        paired_difference_ci([1.0, 2.0], [1.0])
