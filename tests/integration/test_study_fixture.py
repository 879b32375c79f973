"""``compat=jd_study`` against the JD study's own code: the same weights and batches give the same objectives.

The integration tests; the others are in
tests/unit/test_study_fixture.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import compose
from tests.helpers.study_fixture import (
    ARCH,
    CASES,
    CPU,
    FIXTURE,
    _rerun_commands,
    run_like_the_fixture,
    study_trainer,
)
from training.reference_checkpoint import map_reference_state
from training.trainer import Trainer

ROUND_OFF = 2e-6
"""Largest relative difference of two float32 computations of the same update taken as equal (the
study's and this toolkit's engines sum the Jacobian in other orders; measured over every case: at most
5.2e-7, ``iwrm_pixelwise_q_halt_in``)."""


def study_grads(case: dict[str, Any]) -> dict[str, torch.Tensor]:
    grads = dict(case["grads"])
    rows = grads.pop("puzzle_rows")
    mapped, _ = map_reference_state(grads, "fixture")
    return {**mapped, "puzzle_rows": rows}


def relative_difference(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> float:
    names = sorted(theirs)
    a = torch.cat([ours[name].flatten().double() for name in names])
    b = torch.cat([theirs[name].flatten().double() for name in names])
    return float((a - b).norm() / b.norm())


RUNNABLE = sorted(name for name, case in CASES.items() if not case["error"])


PRESET_SETTINGS = [
    ("split/stack_supervisions_and_iwrm_pixelwise", "jd.aggregator_kwargs=null"),  # the exact projector: 2.6e-2
    ("split/pixelwise_q_halt_in", "jd.aggregator_kwargs=null"),  # 7.3e-4
    ("split/stack_supervisions_and_iwrm_pixelwise", "jd.puzzle_rows=per_forward"),  # 9.8e-4 (none where UPGrad finds no conflict)
    ("split/stack_supervisions", "jd.carry_perturbation=carried_samples"),  # 4.0e-3
    ("carry/differential/iwrm_with_q_halt_in", "jd.differential_first_step=zeros"),  # 0.62
    ("carry/differential/stack_supervisions", "jd.differential_first_step=zeros"),  # 0.18
    ("split/stack_supervisions", "jd.max_supervisions=2"),  # 0.42
    ("split/iwrm_with_q_halt_in", "jd.update_scale=num_objectives"),  # m - 1 = 3
    ("split/stack_internal_losses", "jd.intermediate_loss_weight=1.0"),
    ("split/stack_supervisions", "arch.no_act=false"),  # 2.2e-3: the initial Q-head's halting decisions and exploration
]


@pytest.mark.parametrize("name", RUNNABLE)
def test_the_preset_gives_the_studys_objectives_and_update(name: str, study_data: Path, tmp_path: Path) -> None:
    case = CASES[name]
    settings = json.loads(case["settings"])
    trainer = study_trainer(settings, study_data, tmp_path)
    ours, objectives, leaves = run_like_the_fixture(trainer, case, settings)
    assert leaves == 1  # one puzzle-row leaf per optimizer step, as the study's local_weights
    theirs = study_grads(case)
    assert sorted(name for name in theirs if torch.any(theirs[name] != 0)) == sorted(name for name in ours if torch.any(ours[name] != 0))
    assert relative_difference(ours, theirs) < ROUND_OFF
    if "objectives" in case and not settings["n_groups"] and settings["split"] != "sum":
        assert len(objectives) == 1
        # the study divides its objectives by the batch size after aggregate_losses; this toolkit's terms already are
        torch.testing.assert_close(objectives[0].float() * 4, case["objectives"].float(), rtol=1e-5, atol=1e-6)
    if settings["freeze_weights"]:  # the study's sign-SGD step on the puzzle table, here the toolkit's
        trainer.optimizers.step(lr_scale=1.0)
        assert torch.equal(trainer.model.puzzle_embedding.weights, case["puzzle_table_after"])  # type: ignore[union-attr]  # the study model has one


@pytest.mark.parametrize(("name", "override"), PRESET_SETTINGS)
def test_each_setting_of_the_preset_shows_in_the_update(name: str, override: str, study_data: Path, tmp_path: Path) -> None:
    """Without one of the preset's settings, a case that exercises it no longer gives the study's update:
    the fixture tests each setting, not only their sum."""
    case = CASES[name]
    settings = json.loads(case["settings"])
    ours, _, _ = run_like_the_fixture(study_trainer(settings, study_data, tmp_path, override), case, settings)
    assert relative_difference(ours, study_grads(case)) > 100 * ROUND_OFF


@pytest.mark.parametrize("index", range(4))
def test_the_study_pages_rerun_commands_log_the_studys_m(index: int, study_data: Path, tmp_path: Path) -> None:
    """Each docs/study.md command, on the fixture's tiny model, data and Q-head checkpoint (halt_max_steps=5 so
    that K = h shows against the default cap of 4), shortened to 3 steps: it logs the study's m every step."""
    import shlex

    command = _rerun_commands()[index]
    overrides = dict(token.split("=", 1) for token in shlex.split(command)[2:])
    arch = {
        f"arch.{key}": ARCH[key]
        for key in ("hidden_size", "num_heads", "expansion", "H_cycles", "L_cycles", "L_layers", "puzzle_emb_ndim", "puzzle_emb_len", "pos_encodings")
    }
    overrides.update(
        arch,
        **{
            "arch.halt_max_steps": 5,
            "arch.forward_dtype": "float32",
            "init_from": str(FIXTURE / "trm_qhead" / "step_0"),
            "data_paths": f"[{study_data}]",
            "global_batch_size": 4,
            "max_steps": 3,
            "runs_root": str(tmp_path),
            "evaluators": "[{name:exact}]",
            "device": "cpu",
            "progress_bar": False,
            "wandb.mode": "disabled",
            "lr_warmup_steps": 0,
        },
    )
    trainer = Trainer(compose([f"{key}={value}" for key, value in overrides.items()]), CPU)
    assert trainer.config.arch.no_act and trainer.model.core.q_head is None
    split = trainer.jd_step.split
    m = split.num_objectives(batch_size=4, seq_len=16, H_cycles=ARCH["H_cycles"], supervision_steps=split.supervision_steps(5))
    m = min(m, trainer.config.jd.n_groups or m)
    if split.is_supervision_stack:
        assert m == 5  # K = arch.halt_max_steps, as the study's code runs
    trainer.fit()
    records = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [record["jd/num_objectives"] for record in records if "jd/num_objectives" in record]
    assert logged == [m, m, m]
