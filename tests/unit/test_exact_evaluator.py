"""ExactMatchEvaluator and the Wilson score interval.

This file holds the unit tests; the others are in tests/distributed/test_exact_evaluator.py.
"""

from __future__ import annotations

import pytest
import torch

from evaluators.exact import ExactMatchEvaluator, wilson_interval
from models.loss_terms import IGNORE_LABEL_ID
from tests.helpers.exact_evaluator import _batch


@pytest.mark.parametrize(
    ("successes", "n", "low", "high"),
    [
        (8, 10, 0.4902, 0.9433),  # textbook values (e.g. Newcombe 1998, Agresti & Coull 1998)
        (0, 10, 0.0, 0.2775),
        (10, 10, 0.7225, 1.0),
        (50, 100, 0.4038, 0.5962),
        (1, 1, 0.2065, 1.0),
    ],
)
def test_wilson_interval_known_values(successes: int, n: int, low: float, high: float) -> None:
    got_low, got_high = wilson_interval(successes, n)
    assert got_low == pytest.approx(low, abs=1e-4)
    assert got_high == pytest.approx(high, abs=1e-4)


def test_wilson_interval_properties() -> None:
    widths = []
    for n in (10, 100, 1000):
        low, high = wilson_interval(3 * n // 10, n)
        assert low < 0.3 < high
        widths.append(high - low)
        # symmetric in successes <-> failures
        mirrored = wilson_interval(n - 3 * n // 10, n)
        assert mirrored == pytest.approx((1 - high, 1 - low))
    assert widths[0] > widths[1] > widths[2]
    assert wilson_interval(0, 0) == (0.0, 1.0)
    wider = wilson_interval(30, 100, z=2.576)
    assert wider[0] < wilson_interval(30, 100)[0]
    with pytest.raises(ValueError, match="successes=5, n=3"):
        wilson_interval(5, 3)


def test_exact_match_on_hand_made_predictions() -> None:
    I = IGNORE_LABEL_ID  # noqa: E741
    evaluator = ExactMatchEvaluator("sudoku")
    assert evaluator.required_outputs == {"preds"}
    evaluator.begin_eval()
    labels = [[1, 2, 3], [1, 2, I], [4, 4, 4], [5, 5, 5], [I, I, I]]
    preds = [[1, 2, 3], [1, 2, 9], [4, 0, 4], [5, 5, 5], [7, 7, 7]]
    # row 0 exact; row 1 exact (its wrong token is ignored); row 2 wrong; row 3 is padding (skipped);
    # row 4 has no scored token (skipped)
    evaluator.update_batch(_batch(labels, [0, 1, 2, -1, 3]), {"preds": torch.tensor(preds)})
    evaluator.update_batch(_batch([[2, 2, 2]], [4]), {"preds": torch.tensor([[2, 2, 1]])})
    metrics = evaluator.result(None, rank=0, world_size=1)
    assert metrics is not None
    assert metrics["sudoku/count"] == 4
    assert metrics["sudoku/exact_accuracy"] == pytest.approx(0.5)
    low, high = wilson_interval(2, 4)
    assert metrics["sudoku/exact_accuracy_ci_low"] == pytest.approx(low)
    assert metrics["sudoku/exact_accuracy_ci_high"] == pytest.approx(high)
    assert evaluator.result(None, rank=1, world_size=1) is None
    evaluator.begin_eval()  # a new evaluation starts from zero
    assert evaluator.result(None, rank=0, world_size=1)["sudoku/count"] == 0


def test_exact_match_rejects_mismatched_shapes() -> None:
    evaluator = ExactMatchEvaluator()
    with pytest.raises(ValueError, match="preds shape"):
        evaluator.update_batch(_batch([[1, 2]], [0]), {"preds": torch.tensor([[1, 2, 3]])})
