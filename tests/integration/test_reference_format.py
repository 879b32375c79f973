"""The reference TRM code's datasets and checkpoints, against outputs of the reference code itself.

The integration tests; the others are in
tests/unit/test_reference_format.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from analysis.evaluate import main as evaluate_main
from analysis.evaluate import model_from_checkpoint, read_checkpoint
from analysis.export import export
from dataset.puzzle_dataset import PuzzleDataset
from pretrain import run
from tests.conftest import compose, tiny_overrides
from tests.helpers.reference_format import FIXTURE
from training.checkpoint import CheckpointError, list_checkpoints, read_state

MODELS = [("trm_arc", "arc"), ("trm_mlpt_sudoku", "sudoku"), ("hrm_sudoku", "sudoku")]


@pytest.mark.parametrize("name, data", MODELS)
def test_reference_checkpoint_gives_the_reference_outputs(name: str, data: str) -> None:
    """Same weights, same answers: every ACT step's predictions exactly, its halting logits and the final
    logits to float32 round-off. (Bit for bit on the CPU that made the fixture; another CPU's vector
    kernels sum in another order, which moves the last bits: up to 2e-5 after 16 ACT steps on another CPU.)"""
    path, state, config, sizes = read_checkpoint(FIXTURE / "checkpoints" / name, data_paths=[str(FIXTURE / data)])
    loaded = model_from_checkpoint(path, state, config, sizes, device=torch.device("cpu"))
    expected = np.load(FIXTURE / "outputs" / f"{name}.npz")
    preds, q_halts, logits = [], [], []
    with torch.no_grad():
        for batch in PuzzleDataset([FIXTURE / data], "test", 4).test_batches():
            carry = loaded.loss_head.initial_carry(batch)
            for _ in range(config.arch.halt_max_steps):
                carry, _, metrics, outputs, _ = loaded.loss_head(carry, batch, global_batch_size=4)
                preds.append(outputs["preds"].numpy())
                q_halts.append(outputs["q_halt_logits"].numpy())
            logits.append(outputs["logits"].numpy())
    steps = config.arch.halt_max_steps
    got = np.stack(preds).reshape(-1, steps, *preds[0].shape).transpose(0, 2, 1, 3).reshape(expected["preds"].shape)
    assert np.array_equal(got, expected["preds"])
    got_q = np.stack(q_halts).reshape(-1, steps, q_halts[0].shape[0]).transpose(0, 2, 1).reshape(expected["q_halt_logits"].shape)
    np.testing.assert_allclose(got_q, expected["q_halt_logits"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.concatenate(logits)[: len(expected["logits"])], expected["logits"], rtol=1e-4, atol=1e-4)


def test_a_reference_checkpoint_without_its_config_uses_the_weights_and_set_overrides(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "released"
    folder.mkdir()
    shutil.copy(FIXTURE / "checkpoints" / "trm_arc" / "step_7", folder / "step_7")
    overrides = [
        "--set",
        "arch.H_cycles=2",
        "--set",
        "arch.L_cycles=2",
        "--set",
        "arch.num_heads=2",
        "--set",
        "arch.halt_max_steps=3",
        "--set",
        "arch.puzzle_emb_len=2",
        "--set",
        "arch.forward_dtype=float32",
    ]
    status = evaluate_main(
        [str(folder), "--data", str(FIXTURE / "arc"), "--out", str(tmp_path / "out"), "--quiet", "--device", "cpu", "--batch-size", "4", *overrides]
    )
    assert status == 0
    err = capsys.readouterr().err
    assert "all_config.yaml is missing" in err
    assert "arch.hidden_size = 32  (weights)" in err and "arch.num_heads = 2  (--set)" in err and "arch.expansion = 4.0  (reference default)" in err
    # Without --data nothing names the data (no all_config.yaml): refused before any model is built.
    assert evaluate_main([str(folder), "--out", str(tmp_path / "o2"), "--quiet"]) == 2
    assert "give the dataset folder (--data PATH)" in capsys.readouterr().err


@pytest.mark.parametrize("split", ["none", "iwrm_with_q_halt_in"])
def test_training_starts_from_a_reference_checkpoint_on_a_reference_dataset(tmp_path: Path, split: str, capsys: pytest.CaptureFixture[str]) -> None:
    arch = [
        "arch=hrm",
        "arch.hidden_size=32",
        "arch.num_heads=2",
        "arch.expansion=4",
        "arch.H_layers=1",
        "arch.L_layers=1",
        "arch.H_cycles=2",
        "arch.L_cycles=2",
        "arch.halt_max_steps=3",
        "arch.puzzle_emb_ndim=32",
        "arch.puzzle_emb_len=0",
        "arch.forward_dtype=float32",
    ]
    overrides = tiny_overrides(FIXTURE / "sudoku", tmp_path, global_batch_size=4, max_steps=3, eval_interval="null", run_name=f"ft-{split}")
    overrides = [o for o in overrides if not o.startswith("arch.")] + arch
    config = compose(overrides + [f"init_from={FIXTURE / 'checkpoints' / 'hrm_sudoku'}", f"jd.split={split}"])
    summary = run(config)
    assert summary["status"] == "finished" and summary["final_step"] == 3
    assert "init_from: weights from the reference checkpoint" in capsys.readouterr().out
    # Step 0 of the new run starts from the reference weights: the first checkpoint moved away from them by training only.
    raw = read_state(FIXTURE / "checkpoints" / "hrm_sudoku" / "step_5")
    trained = torch.load(list_checkpoints(Path(summary["run_dir"]))[-1], weights_only=True)["model"]
    assert trained["H_init"].equal(raw["model.inner.H_init"])  # a buffer: untouched by training
    assert not trained["core.lm_head.weight"].equal(raw["model.inner.lm_head.weight"])


def test_init_from_refuses_a_model_that_does_not_fit(tmp_path: Path) -> None:
    overrides = tiny_overrides(FIXTURE / "sudoku", tmp_path, global_batch_size=4, max_steps=2, run_name="misfit")
    with pytest.raises(CheckpointError, match="does not fit this model"):
        run(compose(overrides + [f"init_from={FIXTURE / 'checkpoints' / 'trm_mlpt_sudoku'}"]))
    assert not (tmp_path / "sudoku" / "misfit").exists()  # refused before the run directory was made


def test_init_from_refuses_non_finite_weights(tmp_path: Path) -> None:
    state = read_state(FIXTURE / "checkpoints" / "hrm_sudoku" / "step_5")
    poisoned = tmp_path / "nan" / "step_5"
    poisoned.parent.mkdir()
    torch.save({key: torch.full_like(value, float("nan")) if value.is_floating_point() else value for key, value in state.items()}, poisoned)
    (poisoned.parent / "all_config.yaml").write_text((FIXTURE / "checkpoints" / "hrm_sudoku" / "all_config.yaml").read_text())
    overrides = tiny_overrides(FIXTURE / "sudoku", tmp_path, global_batch_size=4, max_steps=2, run_name="poisoned")
    with pytest.raises(CheckpointError, match="non-finite weights"):
        run(compose(overrides + [f"init_from={poisoned}"]))
    assert not (tmp_path / "sudoku" / "poisoned").exists()


@pytest.mark.parametrize(("key", "value", "message"), [("loss", 3, "arch.loss is 3"), ("evaluators", 7, "evaluators is 7")])
def test_a_malformed_reference_all_config_is_one_error(tmp_path: Path, key: str, value: int, message: str) -> None:
    import yaml

    source = FIXTURE / "checkpoints" / "hrm_sudoku"
    bad = tmp_path / "bad"
    shutil.copytree(source, bad)
    config = yaml.safe_load((source / "all_config.yaml").read_text())
    (config["arch"] if key == "loss" else config)[key] = value
    (bad / "all_config.yaml").write_text(yaml.safe_dump(config))
    overrides = tiny_overrides(FIXTURE / "sudoku", tmp_path, global_batch_size=4, max_steps=2, run_name="badcfg")
    with pytest.raises(CheckpointError, match=message):
        run(compose(overrides + [f"init_from={bad / 'step_5'}"]))
    assert evaluate_main([str(bad / "step_5"), "--data", str(FIXTURE / "sudoku"), "--quiet"]) == 2


def test_export_and_reimport_round_trip_bit_for_bit(sudoku_data: Path, tmp_path: Path) -> None:
    summary = run(compose(tiny_overrides(sudoku_data, tmp_path, max_steps=3, eval_interval="null", run_name="exp")))
    target = export(summary["run_dir"], str(tmp_path / "exported"))
    assert target.name == "step_3" and (target.parent / "all_config.yaml").is_file()
    raw = read_state(target)
    assert all(key.startswith("_orig_mod.model.inner.") for key in raw)
    path, state, config, sizes = read_checkpoint(target, data_paths=[str(sudoku_data)])
    own_path, own_state, own_config, own_sizes = read_checkpoint(summary["run_dir"])
    assert sizes == own_sizes and config.arch == own_config.arch.model_copy(update={"forward_dtype": config.arch.forward_dtype})
    original = model_from_checkpoint(own_path, own_state, own_config, own_sizes, device=torch.device("cpu")).model.state_dict()
    reimported = model_from_checkpoint(path, state, config, sizes, device=torch.device("cpu")).model.state_dict()
    assert original.keys() == reimported.keys() and all(torch.equal(original[k], reimported[k]) for k in original)
    with pytest.raises(CheckpointError, match="already exist"):
        export(summary["run_dir"], str(tmp_path / "exported"))


def test_the_visualiser_draws_a_reference_checkpoint(tmp_path: Path) -> None:
    from analysis.visualize_recursion import main as visualize_main

    out = tmp_path / "recursion.png"
    status = visualize_main(
        [str(FIXTURE / "checkpoints" / "trm_arc"), "--data", str(FIXTURE / "arc"), "--index", "0", "--out", str(out), "--device", "cpu"]
    )
    assert status == 0 and out.stat().st_size > 10_000


def test_without_its_config_an_mlp_t_checkpoint_takes_its_puzzle_prefix_from_the_weights(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The mlp_t blocks' token-mixing width is the prefix plus the data's seq_len: the reference's default prefix
    (16) would score near 0; the width gives the fixture's 1, and with it the reference's own answers."""
    folder = tmp_path / "released"
    folder.mkdir()
    shutil.copy(FIXTURE / "checkpoints" / "trm_mlpt_sudoku" / "step_3", folder / "step_3")
    with_config = read_checkpoint(FIXTURE / "checkpoints" / "trm_mlpt_sudoku", data_paths=[str(FIXTURE / "sudoku")])[2]
    recursion = ("H_cycles", "L_cycles", "halt_max_steps", "expansion", "forward_dtype", "no_ACT_continue")
    overrides = {f"arch.{key}": getattr(with_config.arch, key) for key in recursion}
    path, state, config, sizes = read_checkpoint(folder, overrides=overrides, data_paths=[str(FIXTURE / "sudoku")])
    assert config.arch.puzzle_emb_len == with_config.arch.puzzle_emb_len == 1
    loaded = model_from_checkpoint(path, state, config, sizes, device=torch.device("cpu"))
    assert "arch.puzzle_emb_len = 1  (weights (sequence width" in capsys.readouterr().err
    reference = model_from_checkpoint(
        *read_checkpoint(FIXTURE / "checkpoints" / "trm_mlpt_sudoku", data_paths=[str(FIXTURE / "sudoku")]), device=torch.device("cpu")
    )
    batch = next(iter(PuzzleDataset([FIXTURE / "sudoku"], "test", 4).test_batches()))
    with torch.no_grad():
        ours = loaded.loss_head(loaded.loss_head.initial_carry(batch), batch, global_batch_size=4)[3]["logits"]
        theirs = reference.loss_head(reference.loss_head.initial_carry(batch), batch, global_batch_size=4)[3]["logits"]
    assert torch.equal(ours, theirs)
