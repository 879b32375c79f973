"""End-to-end: real tiny trainings on CPU through the same code path as ``pretrain.py``.

The distributed tests; the others are in
tests/unit/test_training.py,
tests/integration/test_training.py.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp

from pretrain import run
from tests.conftest import compose, tiny_overrides
from training.checkpoint import list_checkpoints, load_checkpoint


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _distributed_worker(rank: int, world_size: int, port: int, overrides: list[str], out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size), RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from training.distributed import setup_distributed, teardown_distributed
    from training.trainer import Trainer

    config = compose(overrides)
    trainer = Trainer(config, setup_distributed("cpu"))
    trainer.fit()
    torch.save({k: v.detach().clone() for k, v in trainer.model.state_dict().items()}, Path(out_dir) / f"rank{rank}.pt")
    teardown_distributed()


def test_two_process_gloo_matches_one_process(sudoku_data: Path, tmp_path: Path) -> None:
    common = dict(max_steps=4, eval_interval=100, **{"arch.halt_exploration_prob": 0.0})
    single = run(compose(tiny_overrides(sudoku_data, tmp_path / "one", run_name="single", **common)))
    reference = load_checkpoint(list_checkpoints(Path(single["run_dir"]))[-1])["model"]
    overrides = tiny_overrides(sudoku_data, tmp_path / "two", run_name="double", **common)
    mp.spawn(_distributed_worker, args=(2, _free_port(), overrides, str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for key in reference:
        assert torch.equal(rank0[key], rank1[key]), f"ranks differ on {key}"
        torch.testing.assert_close(rank0[key], reference[key], rtol=1e-4, atol=1e-5, msg=key)
    shutil.rmtree(tmp_path / "two", ignore_errors=True)
