"""Confidence intervals over seeds and differences against a baseline, for ``analysis.compare``.

Both use Student's t (the numbers are a handful of seeds, each one run's final value):

* :func:`mean_interval`: the mean and its two-sided ``confidence`` interval, ``mean ± t(n-1) s/√n``.
* :func:`difference`: method minus baseline. When at least two seeds are shared, the pairs of those
  seeds are compared (paired t: the interval and p-value of the mean per-seed difference), so the
  seed-to-seed spread that both methods share cancels. Otherwise the two samples are compared as
  independent (Welch's t, unequal variances, Welch-Satterthwaite degrees of freedom).

With zero spread (every pair differs by the same amount) the interval is that one value and the
p-value is 0 when it is non-zero, 1 when it is zero.

>>> round(mean_interval([1.0, 2.0, 3.0]).low, 4)
-0.4841
>>> d = difference({0: 0.5, 1: 0.6, 2: 0.7}, {0: 0.4, 1: 0.4, 2: 0.5})
>>> d.test, round(d.estimate, 4), d.n
('paired', 0.1667, 3)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as scipy_stats

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    """A sample's mean with its ``confidence`` interval (``low``/``high`` are None for one value)."""

    mean: float
    low: float | None
    high: float | None
    n: int


@dataclass(frozen=True)
class Difference:
    """Method minus baseline: the estimate, its interval, the two-sided p-value and how it was tested.

    ``test`` is ``"paired"`` (``n`` seed pairs) or ``"welch"`` (``n`` = method runs, ``n_baseline``
    baseline runs); ``low``/``high``/``p_value`` are None where there are too few values to say.
    """

    estimate: float
    low: float | None
    high: float | None
    p_value: float | None
    n: int
    n_baseline: int
    test: str


def _t_interval(estimate: float, standard_error: float, df: float, confidence: float) -> tuple[float, float]:
    half = float(scipy_stats.t.ppf(0.5 + confidence / 2, df)) * standard_error
    return estimate - half, estimate + half


def _t_p_value(estimate: float, standard_error: float, df: float) -> float:
    if standard_error == 0.0:
        return 1.0 if estimate == 0.0 else 0.0
    return float(2.0 * scipy_stats.t.sf(abs(estimate / standard_error), df))


def mean_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """The mean of ``values`` and its t interval (NaN values make every number NaN, as they should)."""
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        raise ValueError("mean_interval needs at least one value")
    mean = float(array.mean())
    if array.size < 2:
        return Interval(mean, None, None, 1)
    standard_error = float(array.std(ddof=1)) / math.sqrt(array.size)
    low, high = _t_interval(mean, standard_error, array.size - 1, confidence)
    return Interval(mean, low, high, int(array.size))


def difference(method: Mapping[object, float], baseline: Mapping[object, float], confidence: float = CONFIDENCE) -> Difference:
    """``method - baseline`` from per-seed values (seed -> value): paired where >= 2 seeds are shared, else Welch."""
    if not method or not baseline:
        raise ValueError("difference needs values for both the method and the baseline")
    shared = [seed for seed in method if seed in baseline]
    if len(shared) >= 2:
        diffs = np.array([method[s] - baseline[s] for s in shared], dtype=np.float64)
        estimate = float(diffs.mean())
        standard_error = float(diffs.std(ddof=1)) / math.sqrt(diffs.size)
        low, high = _t_interval(estimate, standard_error, diffs.size - 1, confidence)
        p_value = _t_p_value(estimate, standard_error, diffs.size - 1)
        return Difference(estimate, low, high, p_value, len(shared), len(shared), "paired")
    a = np.asarray(list(method.values()), dtype=np.float64)
    b = np.asarray(list(baseline.values()), dtype=np.float64)
    estimate = float(a.mean() - b.mean())
    if a.size < 2 or b.size < 2:
        return Difference(estimate, None, None, None, int(a.size), int(b.size), "welch")
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    standard_error = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1)) if va + vb > 0 else a.size + b.size - 2
    low, high = _t_interval(estimate, standard_error, df, confidence)
    return Difference(estimate, low, high, _t_p_value(estimate, standard_error, df), int(a.size), int(b.size), "welch")
