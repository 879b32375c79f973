"""End-to-end: real tiny trainings on CPU through the same code path as ``pretrain.py``.

This file holds the unit tests; the others are in tests/integration/test_training.py, tests/distributed/test_training.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, compose, tiny_overrides
from training.run_dir import RunDirError


def test_aggregator_kwargs_take_a_dict_from_the_command_line() -> None:
    """The README's examples: a Hydra override gives the aggregator its keyword arguments."""
    constant = compose(["jd.split=lm_loss_vs_q_halt_loss", "jd.aggregator=constant", "jd.aggregator_kwargs={weights: [1.0, 0.5]}"])
    assert constant.jd.aggregator_kwargs == {"weights": [1.0, 0.5]}
    quadprog = compose(["jd.split=iwrm_with_q_halt_in", "jd.aggregator_kwargs={projector: {solver: quadprog}}"])
    assert quadprog.jd.aggregator_kwargs == {"projector": {"solver": "quadprog"}}
    assert compose([]).jd.aggregator_kwargs == {}


@pytest.mark.parametrize("arch", ["trm", "hrm", "transformer"])
def test_every_config_key_is_in_the_yaml_so_the_command_line_can_set_it(arch: str) -> None:
    """Hydra refuses ``key=value`` for a key its YAML lacks (it would need ``+key=value``)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf
    from pydantic import BaseModel

    from training.config import TrainConfig, register_hydra_defaults

    register_hydra_defaults()
    with initialize_config_dir(config_dir=str(REPO / "config"), version_base=None):
        raw = OmegaConf.to_container(hydra_compose(config_name="cfg_pretrain", overrides=[f"arch={arch}"]), resolve=False)

    def missing(model: type[BaseModel], values: dict, prefix: str) -> list[str]:
        found = []
        for name, field in model.model_fields.items():
            key = field.alias or name
            if key not in values:
                found.append(prefix + key)
            elif isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel) and isinstance(values[key], dict):
                found += missing(field.annotation, values[key], f"{prefix}{key}.")
        return found

    assert missing(TrainConfig, raw, "") == []


def test_two_runs_starting_with_one_name_cannot_share_its_directory(sudoku_data: Path, tmp_path: Path) -> None:
    """The new run's directory is claimed exclusively: of two runs planned at the same moment (both saw
    no directory yet), the second to create it refuses."""
    from training.distributed import DistInfo, ElasticInfo
    from training.run_dir import plan_run, prepare_run_dir

    config = compose(tiny_overrides(sudoku_data, tmp_path, run_name="twin"))
    cpu = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    first, second = (plan_run(config, ElasticInfo()) for _ in range(2))
    *_, first_lock = prepare_run_dir(config, cpu, first)  # the first run goes on starting: it holds its directory
    assert first_lock is not None
    with pytest.raises(RunDirError, match="already exists|just claimed"):
        prepare_run_dir(config, cpu, second)
    first_lock.release()


def test_a_mistyped_key_suggests_the_closest_one(capsys: pytest.CaptureFixture[str]) -> None:
    from pretrain import main

    assert main(["lrr=1e-3"]) == 2 and "lrr: unknown key; did you mean lr?" in capsys.readouterr().err
    assert main(["+lrr=1e-3"]) == 2 and "did you mean lr?" in capsys.readouterr().err


def test_python_m_jd_lists_what_the_config_accepts() -> None:
    from jd.__main__ import describe
    from jd.scalarizers import scalarizer_names
    from jd.splits import split_names

    text = describe()
    assert all(f"  {name}" in text for name in split_names() + scalarizer_names())
    assert "constant       weights*" in text and "experiment= (config/experiment/): arc1, arc1_single_gpu" in text


def test_compile_regional_is_a_compile_mode() -> None:
    """``compile=regional`` turns compilation on (any device) and asks for the repeated module only."""
    regional = compose(["compile=regional"])
    assert regional.compile_enabled("cpu") and regional.regional_compile
    whole = compose(["compile=true"])
    assert whole.compile_enabled("cpu") and not whole.regional_compile
    assert not compose(["compile=false"]).compile_enabled("cuda")
    assert [compose([f"compile={mode}"]).compile_record("cpu") for mode in ("false", "true", "regional", "auto")] == [False, True, "regional", False]
