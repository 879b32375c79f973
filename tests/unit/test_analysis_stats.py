"""Intervals over seeds and differences against GD (analysis/stats.py, analysis.compare), on known answers.

This file holds the unit tests; the others are in tests/integration/test_analysis_stats.py.
"""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

import analysis.stats
from analysis.stats import difference, mean_interval

T_975_DF4 = 2.7764451051977987  # Student's t quantile 0.975 with 4 degrees of freedom (tables: 2.776)


def test_docstring_examples_run() -> None:
    assert doctest.testmod(analysis.stats).failed == 0


def test_mean_interval_is_the_t_interval() -> None:
    values = [0.2, 0.4, 0.3, 0.5, 0.6]
    interval = mean_interval(values)
    half = T_975_DF4 * np.std(values, ddof=1) / math.sqrt(5)
    assert interval.mean == pytest.approx(0.4) and interval.n == 5
    assert (interval.low, interval.high) == (pytest.approx(0.4 - half), pytest.approx(0.4 + half))
    single = mean_interval([0.7])
    assert (single.mean, single.low, single.high, single.n) == (0.7, None, None, 1)
    with pytest.raises(ValueError, match="at least one"):
        mean_interval([])


def test_paired_difference_cancels_the_seed_effect() -> None:
    # Seeds differ a lot (0.1 ... 0.9); the method adds 0.1 +- 0.01 to each: paired sees it clearly.
    seed_effect = {s: 0.1 + 0.2 * s for s in range(5)}
    noise = [0.01, -0.01, 0.005, -0.005, 0.0]
    method = {s: v + 0.1 + noise[s] for s, v in seed_effect.items()}
    paired = difference(method, seed_effect)
    diffs = np.array([method[s] - seed_effect[s] for s in range(5)])
    half = T_975_DF4 * diffs.std(ddof=1) / math.sqrt(5)
    assert paired.test == "paired" and paired.n == 5
    assert paired.estimate == pytest.approx(0.1)
    assert (paired.low, paired.high) == (pytest.approx(0.1 - half), pytest.approx(0.1 + half))
    assert paired.p_value == pytest.approx(scipy_stats.ttest_rel(list(method.values()), list(seed_effect.values())).pvalue)
    assert paired.p_value < 1e-4
    # The same numbers as unrelated samples: the seed spread swamps the effect.
    unpaired = difference({("a", s): v for s, v in method.items()}, {("b", s): v for s, v in seed_effect.items()})
    assert unpaired.test == "welch" and unpaired.p_value > 0.3
    assert unpaired.p_value == pytest.approx(scipy_stats.ttest_ind(list(method.values()), list(seed_effect.values()), equal_var=False).pvalue)
    assert unpaired.high - unpaired.low > 10 * (paired.high - paired.low)


def test_no_difference_is_not_significant_and_constant_shift_is_exact() -> None:
    base = {0: 0.3, 1: 0.5, 2: 0.4}
    same = difference(dict(base), base)
    assert same.estimate == 0.0 and same.p_value == 1.0 and same.low == same.high == 0.0
    shifted = difference({s: v + 0.25 for s, v in base.items()}, base)
    assert shifted.estimate == pytest.approx(0.25) and shifted.p_value < 1e-12  # round-off leaves a tiny spread
    assert shifted.low == pytest.approx(0.25) and shifted.high == pytest.approx(0.25)
    one_each = difference({9: 0.5}, {0: 0.3})
    assert one_each.test == "welch" and one_each.estimate == pytest.approx(0.2) and one_each.p_value is None
