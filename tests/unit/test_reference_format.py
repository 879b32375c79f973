"""The reference TRM code's datasets and checkpoints, against outputs of the reference code itself.

``tests/fixtures/reference/`` was written by ``make_reference_fixture.py`` there, which ran the
reference repositories' own builders, models, loader and ARC evaluator (see its docstring); nothing
of this toolkit took part in making it.

This file holds the unit tests; the others are in tests/integration/test_reference_format.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from analysis.evaluate import main as evaluate_main
from analysis.evaluate import model_from_checkpoint, read_checkpoint
from dataset.common import DatasetError, read_metadata
from dataset.puzzle_dataset import PuzzleDataset
from evaluators.arc import ARCEvaluator
from tests.helpers.reference_format import FIXTURE
from training.checkpoint import CheckpointError, read_state
from training.reference_checkpoint import map_reference_state


def _copy(name: str, tmp_path: Path) -> Path:
    target = tmp_path / name
    shutil.copytree(FIXTURE / name, target)
    return target


def _edit_json(path: Path, **changes: object) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_reference_dataset_reads_in_place_with_its_sizes() -> None:
    metadata = read_metadata(FIXTURE / "arc")
    reference = json.loads((FIXTURE / "arc" / "train" / "dataset.json").read_text())
    assert (metadata.kind, metadata.seq_len, metadata.vocab_size, metadata.grid_shape) == ("arc", 900, 12, (30, 30))
    assert metadata.num_puzzle_identifiers == reference["num_puzzle_identifiers"]
    assert metadata.splits["train"].total_groups == reference["total_groups"]
    data = PuzzleDataset([FIXTURE / "arc"], "train", 4)
    assert isinstance(data._sources[0].arrays.inputs, np.memmap)  # read in place, not copied
    inputs = np.load(FIXTURE / "arc" / "train" / "all__inputs.npy")
    batch = next(data.train_batches(0))
    assert np.array_equal(batch["inputs"].numpy(), inputs[batch["example_index"].numpy()])
    assert read_metadata(FIXTURE / "sudoku").kind == "sudoku"


def test_reference_dataset_merges_with_the_toolkits_own(sudoku_data: Path, tmp_path: Path) -> None:
    from dataset.build_sudoku_dataset import build_generated_sudoku

    own = tmp_path / "own9"
    build_generated_sudoku(own, size=9, num_train=8, num_test=4, min_givens=30, max_givens=34, seed=1, progress=False)
    merged = PuzzleDataset([own, FIXTURE / "sudoku"], "test", 4)
    assert merged.total_examples == 4 + read_metadata(FIXTURE / "sudoku").splits["test"].total_examples
    with pytest.raises(DatasetError, match="seq_len differs"):
        PuzzleDataset([sudoku_data, FIXTURE / "sudoku"], "train", 4)  # 4x4 with 9x9: refused, named


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            lambda d: (d / "train" / "all__inputs.npy").write_bytes((d / "train" / "all__inputs.npy").read_bytes()[:300]),
            "all__inputs.npy: unreadable or truncated",
        ),
        (
            lambda d: np.save(d / "train" / "all__inputs.npy", np.load(d / "train" / "all__inputs.npy").astype(np.float32)),
            "all__inputs.npy: dtype float32",
        ),
        (lambda d: np.save(d / "train" / "all__labels.npy", np.load(d / "train" / "all__labels.npy") + 20), "all__labels.npy: tokens span"),
        (
            lambda d: np.save(d / "train" / "all__puzzle_indices.npy", np.load(d / "train" / "all__puzzle_indices.npy")[:-1]),
            "all__puzzle_indices.npy",
        ),
        (lambda d: (d / "train" / "all__group_indices.npy").unlink(), "all__group_indices.npy is missing"),
        (lambda d: _edit_json(d / "test" / "dataset.json", seq_len=80), "seq_len=80 differs"),
        (lambda d: _edit_json(d / "train" / "dataset.json", sets=[]), "sets=\\[\\] must be"),
        (lambda d: _edit_json(d / "train" / "dataset.json", total_groups=3), "declares total_groups=3"),
    ],
)
def test_damaged_reference_datasets_are_refused_naming_the_file(tmp_path: Path, damage, message: str) -> None:
    folder = _copy("sudoku", tmp_path)
    damage(folder)
    with pytest.raises(DatasetError, match=message):
        PuzzleDataset([folder], "train", 4)


def test_arc_voting_on_a_reference_build_matches_the_reference_evaluator(tmp_path: Path) -> None:
    """The same predictions, fed to the reference ARC evaluator (fixture) and to this one: same pass@K and submission."""
    fed = np.load(FIXTURE / "arc_vote" / "fed.npz")
    evaluator = ARCEvaluator(FIXTURE / "arc", pass_ks=(1, 2, 5), submission_k=2)
    evaluator.begin_eval()
    data = PuzzleDataset([FIXTURE / "arc"], "test", 4)
    row = 0
    for batch in data.test_batches():
        size = len(batch["inputs"])
        preds = torch.from_numpy(fed["preds"][row : row + size].astype(np.int64))
        evaluator.update_batch(batch, {"preds": preds, "q_halt_logits": torch.from_numpy(fed["q_halt_logits"][row : row + size])})
        row += size
    results = evaluator.result(tmp_path, rank=0, world_size=1)
    expected = json.loads((FIXTURE / "arc_vote" / "results.json").read_text())
    assert {k: results[k] for k in expected} == expected
    assert 0 < expected["ARC/pass@1"] < 1  # the fixture mixes right and wrong votes
    assert json.loads((tmp_path / "submission.json").read_text()) == json.loads((FIXTURE / "arc_vote" / "submission.json").read_text())


def test_evaluators_run_on_a_reference_checkpoint_says_where_values_came_from(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint = _copy("checkpoints", tmp_path) / "hrm_sudoku" / "step_5"
    status = evaluate_main([str(checkpoint), "--data", str(FIXTURE / "sudoku"), "--out", str(tmp_path / "out"), "--quiet", "--device", "cpu"])
    assert status == 0
    err = capsys.readouterr().err
    assert "arch.H_layers = 1  (all_config.yaml)" in err and "data_paths" in err and "(--data)" in err
    record = json.loads((tmp_path / "out" / "metrics.json").read_text())
    expected = np.load(FIXTURE / "outputs" / "hrm_sudoku.npz")
    total = int(read_metadata(FIXTURE / "sudoku").splits["test"].total_examples)
    assert record["step"] == 5
    assert record["metrics"]["eval/exact_accuracy"] == pytest.approx(expected["exact_accuracy"].sum() / total)


def test_unmappable_and_unsafe_reference_checkpoints_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = read_state(FIXTURE / "checkpoints" / "trm_arc" / "step_7")
    with pytest.raises(CheckpointError, match="no counterpart.*model.inner.fancy_head.weight"):
        map_reference_state({**state, "model.inner.fancy_head.weight": torch.zeros(2)}, "x")
    bad = tmp_path / "step_1"
    torch.save({**state, "model.inner.fancy_head.weight": torch.zeros(2)}, bad)
    assert evaluate_main([str(bad), "--data", str(FIXTURE / "arc"), "--quiet"]) == 2
    assert capsys.readouterr().err.count("\n") >= 1
    evil = tmp_path / "evil" / "step_3"
    evil.parent.mkdir()
    torch.save({"model.inner.H_init": torch.zeros(2), "payload": ArithmeticError("x")}, evil)
    assert evaluate_main([str(evil), "--data", str(FIXTURE / "arc"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "never loaded" in err and "weights_only" not in err


def test_the_jd_forks_trmjd_weights_load(tmp_path: Path) -> None:
    path, state, config, sizes = read_checkpoint(FIXTURE / "checkpoints" / "trmjd_sudoku", data_paths=[str(FIXTURE / "sudoku")])
    loaded = model_from_checkpoint(path, state, config, sizes, device=torch.device("cpu"))
    raw = read_state(FIXTURE / "checkpoints" / "trmjd_sudoku" / "step_2")
    assert torch.equal(loaded.model.core.L_level.layers[0].mlp.down_proj.weight, raw["model.inner.L_level.layers.0.mlp.down_proj.weight"])
    assert loaded.config.arch.no_act and loaded.model.core.q_head is None  # all_config.yaml says no_act: no Q-head, as there


def test_export_writes_the_keys_the_reference_model_has() -> None:
    """A reference checkpoint loaded here and exported again has exactly the reference's own keys and tensors."""
    path, state, config, sizes = read_checkpoint(FIXTURE / "checkpoints" / "hrm_sudoku", data_paths=[str(FIXTURE / "sudoku")])
    from training.reference_checkpoint import to_reference_state

    model = model_from_checkpoint(path, state, config, sizes, device=torch.device("cpu")).model
    exported = to_reference_state(model.state_dict(), compiled=False)
    raw = read_state(FIXTURE / "checkpoints" / "hrm_sudoku" / "step_5")
    assert exported.keys() == raw.keys() and all(torch.equal(exported[k], raw[k]) for k in raw)
