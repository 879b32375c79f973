"""``compat=jd_study`` against the JD study's own code: the same weights and batches give the same objectives
and the same update (``.grad`` of every weight and puzzle row), for every split the study's code can run.

The fixture (``tests/fixtures/jd_study/``) was made by running the study's ``train_batch`` with TorchJD
0.8.1 (``make_study_fixture.py`` says how, and every substitution). Each test builds this toolkit's real
trainer from the preset, loads the fixture's weights through ``init_from`` (the reference loader), feeds
the same batches with the same seeds and compares what one optimizer step would apply.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dataset.common import DatasetMetadata, SplitArrays, write_dataset
from tests.conftest import REPO, compose
from training.config import ConfigError
from training.distributed import DistInfo
from training.reference_checkpoint import map_reference_state
from training.train_metrics import SUM_METRICS
from training.trainer import Trainer

FIXTURE = REPO / "tests" / "fixtures" / "jd_study"
RECORD = torch.load(FIXTURE / "cases.pt", weights_only=True)
CASES: dict[str, dict[str, Any]] = RECORD["cases"]
ARCH: dict[str, Any] = json.loads(RECORD["arch"])
CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
ROUND_OFF = 2e-6
"""Largest relative difference of two float32 computations of the same update taken as equal (the
study's and this toolkit's engines sum the Jacobian in other orders; measured over every case: at most
5.2e-7, ``iwrm_pixelwise_q_halt_in``)."""
STUDY_CRASHES = {
    "split/iwrm_with_q_halt_out": "zero-dimensional tensor",
    "split/pixelwise_q_halt_out": "zero-dimensional tensor",
    "split/iwrm_pixelwise_q_halt_out": "zero-dimensional tensor",
    "split/stack_internal_and_sum": "grad can be implicitly created only for scalar outputs",
}
"""The splits the study's code cannot run with its no-ACT model, and the error it raises."""


@pytest.fixture(scope="module")
def study_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dataset of the fixture's sizes (its content is not read: the tests feed the fixture's batches)."""
    generator = np.random.default_rng(0)
    arrays = SplitArrays(
        inputs=generator.integers(1, 6, (8, 16)),
        labels=generator.integers(1, 6, (8, 16)),
        puzzle_identifiers=np.array([1, 2, 3, 4]),
        puzzle_indices=np.array([0, 2, 4, 6, 8]),
        group_indices=np.array([0, 4]),
    )
    metadata = DatasetMetadata(kind="fixture", seq_len=16, vocab_size=6, num_puzzle_identifiers=5, grid_shape=(4, 4))
    path = tmp_path_factory.mktemp("study") / "data"
    return write_dataset(path, metadata, {"train": arrays, "test": arrays}, identifiers=["<blank>", "a", "b", "c", "d"])


def study_trainer(settings: dict[str, Any], data: Path, runs: Path, *extra: str) -> Trainer:
    """The real trainer, ``compat=jd_study``, with the fixture's architecture, weights and case settings."""
    split = "none" if settings["split"] == "sum" else settings["split"]
    arch_keys = (
        "hidden_size",
        "num_heads",
        "expansion",
        "H_cycles",
        "L_cycles",
        "L_layers",
        "halt_max_steps",
        "puzzle_emb_ndim",
        "puzzle_emb_len",
        "pos_encodings",
    )
    checkpoint = FIXTURE / (settings["checkpoint"] or "step_0")
    overrides = [
        "compat=jd_study",
        f"jd.split={split}",
        *(f"arch.{key}={ARCH[key]}" for key in arch_keys),
        "arch.forward_dtype=float32",
        "arch.dropout=0.0",
        f"init_from={checkpoint}",
        f"data_paths=[{data}]",
        f"runs_root={runs}",
        "global_batch_size=4",
        "lr_warmup_steps=0",
        "device=cpu",
        "progress_bar=false",
        "wandb.mode=disabled",
        "eval_steps=[]",
        f"jd.differential_loss={settings['differential_loss']}",
        f"freeze_weights={settings['freeze_weights']}",
        f"jd.carry_perturbation_rate={settings['carry_perturbation_rate']}",
    ]
    if settings["n_groups"]:
        overrides += [f"jd.n_groups={settings['n_groups']}", f"jd.seed={settings['seed']}"]  # the study's permutation stream
    return Trainer(compose(overrides + list(extra)), CPU)


def run_like_the_fixture(trainer: Trainer, case: dict[str, Any], settings: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list[torch.Tensor], int]:
    """Feed the case's batches as the fixture did (seeded per call, no update between calls); return the
    recorded call's gradients (toolkit names; ``puzzle_rows``: the rows' gradient, summed over their leaves),
    its objectives and how many puzzle-row leaves it made."""
    embedding = trainer.model.puzzle_embedding
    assert embedding is not None
    objectives: list[torch.Tensor] = []
    backward = trainer.jd_step.backward

    def recording(steps: Any, params: Any, rows: Any) -> dict[str, float]:
        objectives.append(trainer.jd_step.split.objectives(steps).detach().clone())
        return backward(steps, params, rows)

    trainer.jd_step.backward = recording  # type: ignore[method-assign]  # a recording wrapper around the real method
    for call, batch in enumerate(case["batches"]):
        for parameter in trainer.model.parameters():
            parameter.grad = None
        embedding.clear_pending()
        objectives.clear()
        torch.manual_seed(settings["seed"] + call)
        trainer.accumulate_gradients([{key: value.long() for key, value in batch.items()}])
    grads = {name: p.grad for name, p in trainer.model.named_parameters() if p.grad is not None}
    rows = embedding.pending_rows()
    grads["puzzle_rows"] = sum((leaf.grad for _, leaf in rows if leaf.grad is not None), torch.zeros_like(rows[0][1]))
    return grads, objectives, len(rows)


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


def test_the_fixture_holds_every_split_of_the_study_and_its_crashes() -> None:
    splits = {name.split("/", 1)[1] for name in CASES if name.startswith("split/")}
    assert len(splits) == 16 and "stack_supervisions_and_iwrm_pixelwise" in splits
    crashed = {name: case["error"] for name, case in CASES.items() if case["error"]}
    assert sorted(crashed) == sorted(STUDY_CRASHES)
    for name, message in STUDY_CRASHES.items():
        assert message in crashed[name]


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


@pytest.mark.parametrize(("name", "override"), PRESET_SETTINGS)
def test_each_setting_of_the_preset_shows_in_the_update(name: str, override: str, study_data: Path, tmp_path: Path) -> None:
    """Without one of the preset's settings, a case that exercises it no longer gives the study's update:
    the fixture tests each setting, not only their sum."""
    case = CASES[name]
    settings = json.loads(case["settings"])
    ours, _, _ = run_like_the_fixture(study_trainer(settings, study_data, tmp_path, override), case, settings)
    assert relative_difference(ours, study_grads(case)) > 100 * ROUND_OFF


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


def _gd_grads(trainer: Trainer, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    trainer.accumulate_gradients([{key: value.long() for key, value in batch.items()}])
    rows = trainer.model.puzzle_embedding.pending_rows()  # type: ignore[union-attr]  # the study model has one
    return rows[0][1].grad.clone()


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


# ------------------------------------------------------------------------------------- the README
def _readme_section(start: str, stop: str) -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    begin = text.index(start)
    return text[begin : text.index(stop, begin + len(start))]


def _flat_keys(tree: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        if isinstance(value, dict) and key in ("arch", "jd"):
            keys += _flat_keys(value, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys


def test_every_split_and_setting_has_a_row_in_the_differences_table() -> None:
    import yaml

    from jd.config import JDConfig
    from jd.splits import split_names

    table = _readme_section("### Differences from the JD study's code", "\n## ")
    first_cells = " ".join(line.split("|")[1] for line in table.splitlines() if line.startswith("| "))
    missing = [f"`{name}`" for name in split_names() if f"`{name}`" not in first_cells]
    missing += [f"`jd.{field}`" for field in JDConfig.model_fields if f"`jd.{field}`" not in first_cells]
    preset = yaml.safe_load((REPO / "config" / "compat" / "jd_study.yaml").read_text(encoding="utf-8"))
    missing += [f"`{key}`" for key in _flat_keys(preset) if f"`{key}`" not in first_cells]
    assert not missing, f"README's differences table has no row for {missing}"


def _rerun_commands() -> list[str]:
    section = _readme_section("## Re-running the JD study", "### Differences from the JD study's code")
    block = section.split("```bash\n", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    return [line.strip() for line in block.splitlines() if line.strip().startswith("python pretrain.py ") and " -m " not in line]


def test_the_readme_has_the_rerun_commands_and_each_uses_the_preset() -> None:
    commands = _rerun_commands()
    assert len(commands) >= 4
    assert all("compat=jd_study" in command and "init_from=" in command for command in commands)


@pytest.mark.slow
@pytest.mark.parametrize("index", range(4))
def test_the_readmes_rerun_commands_log_the_studys_m(index: int, study_data: Path, tmp_path: Path) -> None:
    """Each README command, on the fixture's tiny model, data and Q-head checkpoint (halt_max_steps=5 so
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
