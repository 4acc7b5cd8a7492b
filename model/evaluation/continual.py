"""Continual-learning metrics over an accuracy matrix, and confidence intervals over seeds.

``R[i][j]`` is the accuracy on task j (its test split) measured right after learning
task i, for tasks learned in the order 0, 1, ..., T-1 (docs/design.md §5). From it:

- final average accuracy  A_T = 1/T sum_j R[T-1][j]                      (Chaudhry et al. 2018)
- forgetting              F_T = 1/(T-1) sum_{j<T-1} max_{j<=i<=T-2} R[i][j] - R[T-1][j]
                                                                          (Chaudhry et al. 2018)
- backward transfer       BWT = 1/(T-1) sum_{j<T-1} R[T-1][j] - R[j][j]  (Lopez-Paz & Ranzato 2017)

Results over seeds are summarised by a mean and a Student-t confidence interval; two
methods run on the same seeds are compared by the CI of their per-seed differences.
The t quantile is computed here (regularised incomplete beta + bisection) so that the
module needs nothing beyond the standard library and numpy.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence

import numpy as np

Matrix = list[list[float | None]]


#: The states a cycle's diagnostics measure, in the order they happen: (name, what it is).
DIAGNOSTIC_STATES: tuple[tuple[str, str], ...] = (
    ("after_previous_sleep", "the state the wake started from (the sleep of period t-1)"),
    ("after_wake", "after wake t, every level on"),
    ("after_wake_fast_masked", "after wake t, the fastest level masked (what the slower levels still know)"),
    ("after_consolidation", "after consolidation t (the fast level freed)"),
    ("after_dreaming", "after dreaming t: the sleep's final state"),
)


def accuracy_matrix(rows: Sequence[Mapping[int | str, float]], n_tasks: int) -> Matrix:
    """Build R from one mapping per learned task: ``rows[i][j]`` = accuracy on task j after task i.

    Keys may be ints or their string form (as JSON writes them). The result has
    ``len(rows)`` rows of ``n_tasks`` entries; an entry that was not given is None
    (normally every j > i, i.e. tasks not yet learned). A key outside ``[0, n_tasks)``,
    more rows than tasks, or a non-finite value is a ValueError.
    """
    if n_tasks < 1:
        raise ValueError(f"n_tasks must be at least 1, got {n_tasks}")
    if len(rows) > n_tasks:
        raise ValueError(f"{len(rows)} rows of accuracies but only {n_tasks} tasks")
    R: Matrix = []
    for i, row in enumerate(rows):
        out: list[float | None] = [None] * n_tasks
        for key, value in row.items():
            j = int(key)
            if not 0 <= j < n_tasks:
                raise ValueError(f"row {i}: task {key!r} is outside 0..{n_tasks - 1}")
            v = float(value)
            if not math.isfinite(v):
                raise ValueError(f"row {i}: accuracy on task {j} is {v}")
            out[j] = v
        R.append(out)
    return R


def _entry(R: Matrix, i: int, j: int) -> float:
    v = R[i][j]
    if v is None:
        raise ValueError(f"R[{i}][{j}] (accuracy on task {j} after learning task {i}) is missing")
    return float(v)


def _learned(R: Matrix) -> int:
    """T: the number of tasks learned, i.e. rows of R (at least one)."""
    if not R:
        raise ValueError("empty accuracy matrix")
    if len(R[-1]) < len(R):
        raise ValueError(f"{len(R)} rows but only {len(R[-1])} columns: every learned task needs a column")
    return len(R)


def final_average_accuracy(R: Matrix) -> float:
    """A_T: mean accuracy over the T learned tasks after learning the last one (row T-1).

    Columns of tasks not learned yet (j >= T, when R has fewer rows than columns) are
    not counted.
    """
    T = _learned(R)
    return sum(_entry(R, T - 1, j) for j in range(T)) / T


def earlier_tasks_accuracy(R: Matrix) -> float | None:
    """Mean over j < T-1 of R[T-1][j]: what the model still answers of every task before the last, at the end.

    Forgetting measures a task's loss from its own best, so a method that never learned a task well forgets
    little of it; this is the level the earlier tasks end at, whatever they reached before (the question a
    continual learner's user asks: how much of the earlier tasks does it still know?). None when T == 1: there
    is no earlier task.
    """
    T = _learned(R)
    if T == 1:
        return None
    return sum(_entry(R, T - 1, j) for j in range(T - 1)) / (T - 1)


def forgetting(R: Matrix) -> float:
    """Average forgetting F_T (Chaudhry et al. 2018, "Riemannian Walk", eq. 3-4).

    For each task j < T-1: the best accuracy it ever had after being learned and before
    the last task, ``max_{i in [j, T-2]} R[i][j]``, minus its final accuracy
    ``R[T-1][j]``; averaged over those T-1 tasks. Positive means lost accuracy; it is
    negative when every earlier task ended better than it ever was before (the last
    task helped them). With a single task (T == 1) nothing can be forgotten and the
    result is 0.0.
    """
    T = _learned(R)
    if T == 1:
        return 0.0
    total = 0.0
    for j in range(T - 1):
        best = max(_entry(R, i, j) for i in range(j, T - 1))
        total += best - _entry(R, T - 1, j)
    return total / (T - 1)


def backward_transfer(R: Matrix) -> float:
    """BWT (Lopez-Paz & Ranzato 2017, GEM, eq. 3): mean over j < T-1 of R[T-1][j] - R[j][j].

    How much learning the later tasks changed accuracy on each earlier task, relative
    to right after it was learned; negative is forgetting. 0.0 when T == 1.
    """
    T = _learned(R)
    if T == 1:
        return 0.0
    return sum(_entry(R, T - 1, j) - _entry(R, j, j) for j in range(T - 1)) / (T - 1)


# --- Student t quantile -------------------------------------------------------------


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction for the incomplete beta function (modified Lentz's method)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) for x in [0, 1]."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return 1.0 - tail if t > 0 else tail


@functools.lru_cache(maxsize=256)
def t_quantile(q: float, df: float) -> float:
    """The q-quantile of Student's t with ``df`` degrees of freedom (t_cdf inverted by bisection).

    E.g. ``t_quantile(0.975, 2)`` = 4.3027; accurate to ~1e-10.
    """
    if not 0.0 < q < 1.0:
        raise ValueError(f"quantile level must be in (0, 1), got {q}")
    if q == 0.5:
        return 0.0
    if q < 0.5:
        return -t_quantile(1.0 - q, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < q:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the mean and its two-sided Student-t confidence interval.

    ``mean +- t_{(1+confidence)/2, n-1} * s / sqrt(n)`` with s the sample standard
    deviation (ddof=1), e.g. over seeds. With a single value the interval is
    undefined and the bounds are NaN: ``(v, nan, nan)`` (not ``(v, v, v)``, which
    would claim certainty). No values, a non-finite value, or a confidence outside
    (0, 1) is a ValueError.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    x = np.asarray(values, dtype=float)
    if x.ndim != 1 or x.size == 0:
        raise ValueError("mean_ci needs a non-empty 1-D sequence of values")
    if not np.isfinite(x).all():
        raise ValueError(f"non-finite value in {x.tolist()}")
    m = float(x.mean())
    n = x.size
    if n == 1:
        return m, math.nan, math.nan
    half = t_quantile((1.0 + confidence) / 2.0, n - 1) * float(x.std(ddof=1)) / math.sqrt(n)
    return m, m - half, m + half


def paired_difference_ci(
    a: Sequence[float], b: Sequence[float], confidence: float = 0.95
) -> tuple[float, float, float]:
    """(mean, low, high) of the per-seed differences ``a[k] - b[k]`` (a paired t interval).

    ``a`` and ``b`` are the same metric for two methods run on the same seeds, in the
    same order; pairing removes the seed-to-seed variance they share. The interval
    excludes 0 exactly when a paired t-test rejects equality at level 1 - confidence.
    """
    if len(a) != len(b):
        raise ValueError(f"paired values need equal lengths, got {len(a)} and {len(b)}")
    return mean_ci(np.asarray(a, dtype=float) - np.asarray(b, dtype=float), confidence)
