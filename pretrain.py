"""Train a Tiny Recursive Model, with plain gradient descent or Jacobian descent.

    python pretrain.py                                   # the embedded demo (4x4 Sudoku, CPU, minutes)
    python pretrain.py experiment=arc1                   # a paper preset (config/experiment/)
    python pretrain.py jd.split=iwrm_with_q_halt_in jd.aggregator=upgrad
    torchrun --nproc-per-node 4 pretrain.py experiment=arc1
    python pretrain.py load_checkpoint=runs/PROJECT/RUN   # resume a run

Flow: Hydra composes ``config/`` -> :func:`training.config.parse_config` validates it (errors stop the
run here, before any compute) -> :class:`training.trainer.Trainer` builds data, model, optimizers and
the run directory -> ``fit()`` trains, evaluates, checkpoints and prints where the run lives.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from dataset.common import DatasetError
from training.checkpoint import CheckpointError
from training.config import DEMO_DATA_PATH, ConfigError, TrainConfig, parse_config
from training.distributed import DistInfo, setup_distributed, teardown_distributed
from training.run_dir import RunDirError

USER_ERRORS = (ConfigError, DatasetError, CheckpointError, RunDirError)


def ensure_demo_data(config: TrainConfig, dist_info: DistInfo) -> None:
    """Build the demo dataset on first use (only for the default ``data_paths``)."""
    if config.data_paths != [DEMO_DATA_PATH] or Path(DEMO_DATA_PATH).exists():
        return
    if dist_info.is_main:
        from dataset.build_sudoku_dataset import build_generated_sudoku

        print(f"Building the demo dataset (4x4 Sudoku with a unique solution) in {DEMO_DATA_PATH} ...", flush=True)
        build_generated_sudoku(DEMO_DATA_PATH, size=4, num_train=2000, num_test=200, min_givens=6, max_givens=9, seed=0, progress=False)
    if dist_info.world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def run(config: TrainConfig) -> dict:
    """Train one run from a validated config; return its summary."""
    from training.trainer import Trainer

    dist_info = setup_distributed(config.device)
    try:
        ensure_demo_data(config, dist_info)
        trainer = Trainer(config, dist_info)
        summary = trainer.fit()
        if dist_info.is_main:
            shown = {k: round(v, 4) for k, v in summary["eval"].items() if "accuracy" in k or "pass@" in k}
            print(f"\nRun {summary['status']} at step {summary['final_step']}. Evaluation: {shown}")
            print(f"Run directory: {summary['run_dir']}")
        return summary
    finally:
        teardown_distributed()


@hydra.main(config_path="config", config_name="cfg_pretrain", version_base=None)
def main(raw: DictConfig) -> None:
    try:
        config = parse_config(raw)
        run(config)
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
