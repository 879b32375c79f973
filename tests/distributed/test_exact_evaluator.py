"""ExactMatchEvaluator and the Wilson score interval.

The distributed tests; the others are in
tests/unit/test_exact_evaluator.py.
"""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from evaluators.exact import ExactMatchEvaluator
from tests.helpers.exact_evaluator import _batch


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _distributed_worker(rank: int, world_size: int, port: int, results: dict[int, object]) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        evaluator = ExactMatchEvaluator()
        evaluator.begin_eval()
        # rank 0: 2 of 2 exact; rank 1: 1 of 3 exact (plus one padding row)
        labels = [[1, 1], [2, 2]] if rank == 0 else [[1, 1], [2, 2], [3, 3], [0, 0]]
        preds = [[1, 1], [2, 2]] if rank == 0 else [[1, 1], [0, 2], [3, 0], [0, 0]]
        index = [0, 1] if rank == 0 else [2, 3, 4, -1]
        evaluator.update_batch(_batch(labels, index), {"preds": torch.tensor(preds)})
        results[rank] = evaluator.result(None, rank, world_size)
    finally:
        dist.destroy_process_group()


def test_exact_match_sums_counts_across_ranks() -> None:
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_distributed_worker, args=(2, _free_port(), results), nprocs=2, join=True)
        results = dict(results)
    assert results[1] is None
    assert results[0]["exact/count"] == 5
    assert results[0]["exact/exact_accuracy"] == pytest.approx(3 / 5)
    assert not math.isnan(results[0]["exact/exact_accuracy_ci_low"])
