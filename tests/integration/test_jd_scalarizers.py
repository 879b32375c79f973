"""Loss-weighting baselines (``jd.scalarizer``): by name, validated, exact, one backward, and trainable.

The integration tests; the others are in
tests/unit/test_jd_scalarizers.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import compose, tiny_overrides


def test_a_sized_scalarizer_with_a_varying_number_of_objectives_is_refused(sudoku_data: Path, tmp_path: Path) -> None:
    from training.config import ConfigError
    from training.distributed import DistInfo
    from training.trainer import Trainer

    config = compose(tiny_overrides(sudoku_data, tmp_path, run_name="varying", **{"jd.split": "stack_supervisions", "jd.scalarizer": "uw"}))
    with pytest.raises(ConfigError, match="keeps one value per objective.*jd.supervision_loop=carry"):
        Trainer(config, DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
