"""Sudoku and Maze builders: generators, solvers, augmentations, CSV import, written datasets.

The integration tests; the others are in
tests/unit/test_sudoku_maze.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dataset.build_sudoku_dataset import (
    build_generated_sudoku,
)
from dataset.common import DatasetError


def test_build_generated_sudoku_reports_an_exhausted_puzzle_space(tmp_path: Path) -> None:
    # There are far fewer than 5000 distinct 4x4 puzzles with 15 givens (288 grids x 16 blanks).
    with pytest.raises(DatasetError, match="distinct"):
        build_generated_sudoku(tmp_path / "x", size=4, num_train=5000, num_test=0, givens=15, progress=False, max_attempts_factor=1)
    assert not (tmp_path / "x").exists()
