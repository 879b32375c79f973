"""Shared fixtures: tiny model configs and a tiny generated dataset, so tests stay fast on CPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from models.recursive_reasoning.config import ArchConfig

os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(1)

# Fixtures shared by the unit, integration and distributed tests of one topic.
pytest_plugins = [
    "tests.helpers.analysis",
    "tests.helpers.arc_dataset",
    "tests.helpers.arc_evaluator",
    "tests.helpers.eval_and_visualize",
    "tests.helpers.study_fixture",
]

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"


def tiny_arch(**overrides: object) -> ArchConfig:
    """A TRM small enough to train for a few steps in well under a second."""
    values: dict[str, object] = dict(
        name="trm",
        hidden_size=32,
        num_heads=2,
        expansion=2,
        L_layers=1,
        H_cycles=2,
        L_cycles=1,
        puzzle_emb_ndim=32,
        puzzle_emb_len=1,
        halt_max_steps=3,
        halt_exploration_prob=0.1,
    )
    values.update(overrides)
    return ArchConfig(**values)  # type: ignore[arg-type]  # pydantic validates the values


def tiny_trm_batch() -> dict[str, torch.Tensor]:
    """Three 16-token samples for an 11-token model (the last 4 labels ignored), puzzle ids 0, 2, 3."""
    from models.loss_terms import IGNORE_LABEL_ID

    generator = torch.Generator().manual_seed(1)
    batch = {
        "inputs": torch.randint(1, 11, (3, 16), generator=generator),
        "labels": torch.randint(1, 11, (3, 16), generator=generator),
        "puzzle_identifiers": torch.tensor([0, 2, 3]),
    }
    batch["labels"][:, 12:] = IGNORE_LABEL_ID
    return batch


def tiny_overrides(data_dir: Path, run_root: Path, **extra: object) -> list[str]:
    """Hydra overrides for a tiny CPU run of ``pretrain.py`` on ``data_dir``."""
    values: dict[str, object] = {
        "data_paths": f"[{data_dir}]",
        "runs_root": str(run_root),
        "arch.hidden_size": 32,
        "arch.num_heads": 2,
        "arch.expansion": 2,
        "arch.L_layers": 1,
        "arch.H_cycles": 2,
        "arch.L_cycles": 1,
        "arch.halt_max_steps": 3,
        "global_batch_size": 16,
        "epochs": 4,
        "eval_interval": 2,
        "lr_warmup_steps": 2,
        "device": "cpu",
        "progress_bar": False,
        "wandb.mode": "disabled",
    }
    values.update(extra)
    return [f"{key}={value}" for key, value in values.items()]


@pytest.fixture(scope="session")
def sudoku_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small generated 4x4 Sudoku dataset (real files, built by the real builder)."""
    from dataset.build_sudoku_dataset import build_generated_sudoku

    path = tmp_path_factory.mktemp("data") / "sudoku4"
    build_generated_sudoku(path, size=4, num_train=96, num_test=24, min_givens=7, max_givens=9, seed=0, progress=False)
    return path


def compose(overrides: list[str]) -> TrainConfig:  # noqa: F821 - imported lazily
    """The validated config ``pretrain.py`` would build from these command-line overrides."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from training.config import parse_config, register_hydra_defaults

    register_hydra_defaults()
    with initialize_config_dir(config_dir=str(REPO / "config"), version_base=None):
        raw = hydra_compose(config_name="cfg_pretrain", overrides=overrides)
    return parse_config(raw)


_LOCATION_MARKERS = {"integration": ("integration", "slow"), "distributed": ("distributed", "slow"), "gpu": ("gpu",)}
"""The markers a test gets from the folder it lives in (tests/unit gets none)."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Markers from each test's folder; tests marked ``gpu`` are skipped without CUDA, with the reason."""
    skip = pytest.mark.skip(reason="needs CUDA (marked gpu); run on a GPU machine, e.g. by python -m analysis.device_check")
    for item in items:
        for name in _LOCATION_MARKERS.get(item.path.parent.name, ()):
            item.add_marker(name)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip)
