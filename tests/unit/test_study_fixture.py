"""``compat=jd_study`` against the JD study's own code: the same weights and batches give the same objectives
and the same update (``.grad`` of every weight and puzzle row), for every split the study's code can run.

The fixture (``tests/fixtures/jd_study/``) was made by running the study's ``train_batch`` with TorchJD
0.8.1 (``make_study_fixture.py`` says how, and every substitution). Each test builds this toolkit's real
trainer from the preset, loads the fixture's weights through ``init_from`` (the reference loader), feeds
the same batches with the same seeds and compares what one optimizer step would apply.

This file holds the unit tests; the others are in tests/integration/test_study_fixture.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import REPO
from tests.helpers.study_fixture import (
    ARCH,
    CASES,
    _rerun_commands,
    _study_page_section,
    run_like_the_fixture,
    study_trainer,
)
from training.config import ConfigError
from training.train_metrics import SUM_METRICS
from training.trainer import Trainer

STUDY_CRASHES = {
    "split/iwrm_with_q_halt_out": "zero-dimensional tensor",
    "split/pixelwise_q_halt_out": "zero-dimensional tensor",
    "split/iwrm_pixelwise_q_halt_out": "zero-dimensional tensor",
    "split/stack_internal_and_sum": "grad can be implicitly created only for scalar outputs",
}
"""The splits the study's code cannot run with its no-ACT model, and the error it raises."""


def _gd_grads(trainer: Trainer, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    trainer.accumulate_gradients([{key: value.long() for key, value in batch.items()}])
    rows = trainer.model.puzzle_embedding.pending_rows()  # type: ignore[union-attr]  # the study model has one
    return rows[0][1].grad.clone()


def _flat_keys(tree: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        if isinstance(value, dict) and key in ("arch", "jd"):
            keys += _flat_keys(value, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys


def test_the_fixture_holds_every_split_of_the_study_and_its_crashes() -> None:
    splits = {name.split("/", 1)[1] for name in CASES if name.startswith("split/")}
    assert len(splits) == 16 and "stack_supervisions_and_iwrm_pixelwise" in splits
    crashed = {name: case["error"] for name, case in CASES.items() if case["error"]}
    assert sorted(crashed) == sorted(STUDY_CRASHES)
    for name, message in STUDY_CRASHES.items():
        assert message in crashed[name]


@pytest.mark.parametrize("name", ["carry/iwrm_with_q_halt_in", "carry/differential/stack_supervisions"])
def test_the_preset_counts_hard_examples_as_the_study(name: str, study_data: Path, tmp_path: Path) -> None:
    """The study credits "correct" to the incoming batch's identifiers (a defect the preset keeps, named)."""
    case = CASES[name]
    settings = json.loads(case["settings"])
    trainer = study_trainer(settings, study_data, tmp_path)
    run_like_the_fixture(trainer, case, settings)
    expected = torch.zeros(2, 5, dtype=torch.float64)
    for counts in json.loads(case["counts"]):
        for identifier, (seen, correct) in counts.items():
            expected[:, int(identifier)] += torch.tensor([seen, correct], dtype=torch.float64)
    assert trainer.data.sampler is not None
    trainer.data.sampler.sync()
    assert torch.equal(trainer.data.sampler.totals, expected)
    assert expected[0].sum() > 0


@pytest.mark.parametrize("name", ["split/iwrm_with_q_halt_out", "split/pixelwise_q_halt_out", "split/iwrm_pixelwise_q_halt_out"])
def test_splits_the_study_cannot_run_are_refused_by_the_preset(name: str, study_data: Path, tmp_path: Path) -> None:
    settings = json.loads(CASES[name]["settings"])
    with pytest.raises(ConfigError, match="zero-dimensional tensor"):
        study_trainer(settings, study_data, tmp_path)


def test_a_stack_from_a_trained_q_head_runs_the_studys_k_and_drops_the_head(study_data: Path, tmp_path: Path) -> None:
    case = CASES["qhead_checkpoint/stack_supervisions"]
    settings = json.loads(case["settings"])
    trainer = study_trainer(settings, study_data, tmp_path)
    assert trainer.model.core.q_head is None
    result = trainer.accumulate_gradients([{key: value.long() for key, value in case["batches"][0].items()}])
    assert result.jd_metrics["jd/num_objectives"] == ARCH["halt_max_steps"]  # K = halt_max_steps, every step
    assert dict(zip(SUM_METRICS, result.sums.tolist()))["sample_steps"] == 4 * ARCH["halt_max_steps"]


@pytest.mark.parametrize("preset", [True, False])
def test_frozen_weights_with_iwrm_are_not_gradient_descent(preset: bool, study_data: Path, tmp_path: Path) -> None:
    """freeze_weights + IWRM + UPGrad: the weights stay in the Jacobian, so the puzzle rows' update is not GD's
    (with them left out it would be exactly GD, which the config refuses). Each row's update is a positive
    multiple ``m w_b`` of its GD gradient; JD shows in how those multiples differ between samples, which
    moves the summed gradient of an identifier that several samples share (and so its sign-SGD step)."""
    case = CASES["freeze/iwrm_with_q_halt_in"]
    settings = json.loads(case["settings"])
    batch = case["batches"][0]
    compat = [] if preset else ["jd.aggregator_kwargs=null", "jd.update_scale=num_objectives", "custom_sampling=false"]
    torch.manual_seed(0)
    jd_rows = _gd_grads(study_trainer(settings, study_data, tmp_path / "jd", *compat), batch)
    torch.manual_seed(0)
    gd_rows = _gd_grads(study_trainer(dict(settings, split="sum"), study_data, tmp_path / "gd", *compat), batch)
    cosines = torch.nn.functional.cosine_similarity(jd_rows, gd_rows, dim=1)
    assert torch.all(cosines > 1 - 1e-5)  # each row: a positive multiple of its GD gradient
    scales = jd_rows.norm(dim=1) / gd_rows.norm(dim=1)
    assert scales.max() / scales.min() > 1.005  # GD: one multiple for every sample (measured here: 0.2500 to 0.2551)
    with pytest.raises(ConfigError, match="gradient descent by construction"):
        study_trainer(settings, study_data, tmp_path / "left", *compat, "jd.frozen_weights=left_out")


def test_every_split_and_setting_has_a_row_in_the_differences_table() -> None:
    import yaml

    from jd.config import JDConfig
    from jd.splits import split_names

    table = _study_page_section("## Differences from the JD study's code")
    first_cells = " ".join(line.split("|")[1] for line in table.splitlines() if line.startswith("| "))
    missing = [f"`{name}`" for name in split_names() if f"`{name}`" not in first_cells]
    missing += [f"`jd.{field}`" for field in JDConfig.model_fields if f"`jd.{field}`" not in first_cells]
    preset = yaml.safe_load((REPO / "config" / "compat" / "jd_study.yaml").read_text(encoding="utf-8"))
    missing += [f"`{key}`" for key in _flat_keys(preset) if f"`{key}`" not in first_cells]
    assert not missing, f"docs/study.md's differences table has no row for {missing}"


def test_the_study_page_has_the_rerun_commands_and_each_uses_the_preset() -> None:
    commands = _rerun_commands()
    assert len(commands) >= 4
    assert all("compat=jd_study" in command and "init_from=" in command for command in commands)
