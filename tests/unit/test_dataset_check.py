"""``python -m dataset.check``: test/train overlap of identifiers and inputs, on real dataset folders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from dataset.arc_augment import Augmentation, grid_to_tokens
from dataset.check import canonical_arc_inputs, main, overlap_report


def test_the_demo_dataset_has_no_overlap(tmp_path: Path) -> None:
    from dataset.build_sudoku_dataset import build_generated_sudoku

    demo = build_generated_sudoku(tmp_path / "demo", size=4, num_train=2000, num_test=200, min_givens=6, max_givens=9, seed=0, progress=False)
    report = overlap_report(demo)
    assert report["test_inputs_in_training"] == 0 and report["test_identifiers_in_training"] == 0
    assert report["test_puzzles_with_blank_identifier"] == 200


def test_a_planted_test_input_is_found(sudoku_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    crafted = Path(shutil.copytree(sudoku_data, tmp_path / "crafted"))
    assert overlap_report(crafted)["test_inputs_in_training"] == 0
    train_inputs = np.load(crafted / "train" / "inputs.npy")
    test_inputs = np.load(crafted / "test" / "inputs.npy")
    test_inputs[[2, 5]] = train_inputs[[7, 11]]
    np.save(crafted / "test" / "inputs.npy", test_inputs)
    assert main([str(crafted), "--json", str(tmp_path / "overlap.json")]) == 0
    assert "test inputs identical to a training input: 2" in capsys.readouterr().out
    assert json.loads((tmp_path / "overlap.json").read_text())[0]["test_inputs_in_training"] == 2


def test_arc_inputs_are_compared_with_their_augmentation_inverted() -> None:
    grid = np.array([[1, 2, 0], [0, 3, 3]], dtype=np.uint8)
    augmentation = Augmentation(dihedral=3, colour_map=(0, 2, 3, 1, 4, 5, 6, 7, 8, 9))
    names = ["<blank>", "abc", augmentation.name("abc")]
    inputs = np.stack([grid_to_tokens(grid), grid_to_tokens(augmentation.apply(grid))])
    plain, augmented = canonical_arc_inputs(inputs, np.array([1, 2]), names)
    assert plain == augmented and inputs[0].tobytes() != inputs[1].tobytes()


def test_arc_identifiers_of_test_puzzles_label_their_demonstrations(arc_data: Path) -> None:
    report = overlap_report(arc_data)
    assert report["test_identifiers_in_training"] == report["test_puzzles"] > 0  # by design in ARC
    assert report["test_inputs_in_training_after_inverting_augmentation"] >= report["test_inputs_in_training"]


def test_a_missing_dataset_is_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")


def test_reference_format_folders_are_read_as_they_are() -> None:
    from tests.conftest import FIXTURES

    arc = overlap_report(FIXTURES / "reference" / "arc")  # built by the reference code's own builder
    assert arc["kind"] == "arc" and arc["test_identifiers_in_training"] == arc["test_puzzles"] == 6
    assert arc["test_inputs_in_training_after_inverting_augmentation"] == 0
    assert overlap_report(FIXTURES / "reference" / "sudoku")["test_inputs_in_training"] == 0
