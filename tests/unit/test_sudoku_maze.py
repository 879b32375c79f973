"""Sudoku and Maze builders: generators, solvers, augmentations, CSV import, written datasets.

This file holds the unit tests; the others are in tests/integration/test_sudoku_maze.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dataset.build_maze_dataset import (
    CHARSET,
    build_generated_maze,
    build_maze_from_csv,
    count_shortest_paths,
    dihedral,
    generate_maze,
    mark_path,
    read_maze_csv,
    shortest_path,
)
from dataset.build_sudoku_dataset import (
    augment_sudoku,
    augment_sudoku_batch,
    build_generated_sudoku,
    build_sudoku_from_csv,
    count_solutions,
    generate_sudoku,
    is_valid_solution,
    read_sudoku_csv,
    solve_sudoku,
)
from dataset.build_sudoku_dataset import (
    main as sudoku_main,
)
from dataset.common import DatasetError, read_metadata, read_split

PUZZLE_9 = "53..7....6..195....98....6.8...6...34..8.3..17...2...6.6....28....419..5....8..79"


SOLUTION_9 = "534678912672195348198342567859761423426853791713924856961537284287419635345286179"


def _grid(text: str) -> np.ndarray:
    return np.array([0 if char in ".0" else int(char) for char in text]).reshape(9, 9)


def _write_csv(path: Path, rows: list[tuple[str, str]], header: str = "source,question,answer,rating") -> Path:
    lines = [header] + [f"hand,{question},{answer},0" for question, answer in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


TWO_ROUTES = ["S   ", " ## ", " ## ", "   G"]


MAZE_5 = ["S   #", "### #", "#   #", "# ###", "#   G"]


def _maze(rows: list[str]) -> np.ndarray:
    return np.array([list(row) for row in rows], dtype="<U1")


MAZE_5_TEXT = "".join(MAZE_5)


def test_count_solutions_of_empty_4x4_is_the_number_of_4x4_grids() -> None:
    assert count_solutions(np.zeros((4, 4), dtype=int), limit=1000) == 288


def test_solver_on_a_known_9x9_puzzle() -> None:
    puzzle, solution = _grid(PUZZLE_9), _grid(SOLUTION_9)
    assert count_solutions(puzzle) == 1
    np.testing.assert_array_equal(solve_sudoku(puzzle), solution)
    assert is_valid_solution(solution)
    clashing = puzzle.copy()
    clashing[0, 2] = 5  # a second 5 in the first row
    assert count_solutions(clashing) == 0
    assert solve_sudoku(clashing) is None


def test_is_valid_solution_rejects_broken_grids() -> None:
    solution = _grid(SOLUTION_9)
    swapped = solution.copy()
    swapped[0, [0, 1]] = swapped[0, [1, 0]]  # rows still fine, columns broken
    assert not is_valid_solution(swapped)
    assert not is_valid_solution(_grid(PUZZLE_9))  # blanks
    assert not is_valid_solution(solution[:8, :8])
    # Rows and columns are Latin but the 2x2 boxes repeat digits.
    assert not is_valid_solution(np.array([[1, 2, 3, 4], [2, 3, 4, 1], [3, 4, 1, 2], [4, 1, 2, 3]]))


@pytest.mark.parametrize(("size", "givens"), [(4, 5), (6, 12), (9, 30)])
def test_generated_sudoku_has_exactly_one_solution(size: int, givens: int) -> None:
    rng = np.random.default_rng(size)
    for _ in range(5 if size == 9 else 20):
        puzzle, solution = generate_sudoku(size, givens, rng)
        assert puzzle.shape == solution.shape == (size, size)
        assert is_valid_solution(solution)
        given = puzzle != 0
        np.testing.assert_array_equal(puzzle[given], solution[given])
        assert int(given.sum()) == givens
        assert count_solutions(puzzle, limit=2) == 1
        np.testing.assert_array_equal(solve_sudoku(puzzle), solution)


def test_generate_sudoku_rejects_bad_arguments() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="size 5"):
        generate_sudoku(5, 10, rng)
    with pytest.raises(ValueError, match="givens"):
        generate_sudoku(4, 17, rng)


@pytest.mark.parametrize("size", [4, 6, 9])
def test_augmentation_keeps_validity_and_uniqueness(size: int) -> None:
    rng = np.random.default_rng(1)
    puzzle, solution = generate_sudoku(size, {4: 6, 6: 14, 9: 32}[size], rng)
    seen = set()
    for _ in range(10):
        new_puzzle, new_solution = augment_sudoku(puzzle, solution, rng)
        assert is_valid_solution(new_solution)
        given = new_puzzle != 0
        assert given.sum() == (puzzle != 0).sum()
        np.testing.assert_array_equal(new_puzzle[given], new_solution[given])
        assert count_solutions(new_puzzle) == 1
        seen.add(new_solution.tobytes())
    assert len(seen) > 1  # the augmentations do change the grid
    puzzles, solutions = augment_sudoku_batch(puzzle, solution, 30, rng)
    assert puzzles.shape == solutions.shape == (30, size, size)
    assert all(is_valid_solution(grid) for grid in solutions)
    np.testing.assert_array_equal(puzzles != 0, (puzzles != 0) & (puzzles == solutions))
    assert len({grid.tobytes() for grid in solutions}) > 20


def test_build_generated_sudoku_writes_a_consistent_dataset(tmp_path: Path) -> None:
    out = build_generated_sudoku(tmp_path / "s4", size=4, num_train=60, num_test=20, min_givens=5, max_givens=7, seed=3, num_aug=2, progress=False)
    metadata = read_metadata(out)
    assert (metadata.kind, metadata.seq_len, metadata.vocab_size, metadata.grid_shape) == ("sudoku", 16, 11, (4, 4))
    assert metadata.num_puzzle_identifiers == 1 and json.loads((out / "identifiers.json").read_text()) == ["<blank>"]
    train, test = read_split(out, "train"), read_split(out, "test")
    assert train.inputs.shape == (60 * 3, 16) and test.inputs.shape == (20, 16)
    assert len(train.group_indices) == 61 and np.all(np.diff(train.group_indices) == 3)
    for split in (train, test):
        assert np.all(split.puzzle_identifiers == 0)
        assert split.inputs.min() >= 1 and split.inputs.max() <= 5 and split.labels.min() >= 2
        for inputs, labels in zip(split.inputs.astype(int), split.labels.astype(int)):
            puzzle, solution = (inputs - 1).reshape(4, 4), (labels - 1).reshape(4, 4)
            assert is_valid_solution(solution)
            assert 5 <= np.count_nonzero(puzzle) <= 7
            np.testing.assert_array_equal(puzzle[puzzle != 0], solution[puzzle != 0])
            assert count_solutions(puzzle) == 1
    originals = {row.tobytes() for row in train.inputs[train.group_indices[:-1]]}
    assert originals.isdisjoint(row.tobytes() for row in test.inputs)
    assert len({row.tobytes() for row in test.inputs}) == 20


def test_build_generated_sudoku_is_seeded_and_never_overwrites(tmp_path: Path) -> None:
    first = build_generated_sudoku(tmp_path / "a", size=4, num_train=10, num_test=5, seed=7, progress=False)
    second = build_generated_sudoku(tmp_path / "b", size=4, num_train=10, num_test=5, seed=7, progress=False)
    np.testing.assert_array_equal(read_split(first, "train").inputs, read_split(second, "train").inputs)
    before = (first / "train" / "inputs.npy").read_bytes()
    with pytest.raises(DatasetError, match="already exists"):
        build_generated_sudoku(first, size=4, num_train=10, num_test=5, seed=8, progress=False)
    assert (first / "train" / "inputs.npy").read_bytes() == before
    build_generated_sudoku(first, size=4, num_train=10, num_test=5, seed=8, overwrite=True, progress=False)
    assert (first / "train" / "inputs.npy").read_bytes() != before


def test_sudoku_cli_generate(tmp_path: Path) -> None:
    sudoku_main(["--output-dir", str(tmp_path / "cli"), "--generate", "--size", "6", "--num-train", "4", "--num-test", "2", "--givens", "14"])
    assert read_metadata(tmp_path / "cli").grid_shape == (6, 6)
    with pytest.raises(SystemExit):
        sudoku_main(["--output-dir", str(tmp_path / "bad"), "--generate", "--input-csv", "x.csv"])


def test_sudoku_csv_import(tmp_path: Path) -> None:
    blanks_as_zero = PUZZLE_9.replace(".", "0")
    train_csv = _write_csv(tmp_path / "train.csv", [(PUZZLE_9, SOLUTION_9), (blanks_as_zero, SOLUTION_9), (SOLUTION_9, SOLUTION_9)])
    test_csv = _write_csv(tmp_path / "test.csv", [(PUZZLE_9, SOLUTION_9)])
    puzzles, solutions = read_sudoku_csv(train_csv)
    assert puzzles.shape == solutions.shape == (3, 9, 9)
    np.testing.assert_array_equal(puzzles[0], puzzles[1])  # '.' and '0' both mean blank
    np.testing.assert_array_equal(puzzles[2], solutions[2])
    out = build_sudoku_from_csv(tmp_path / "ds", train_csv, test_csv, subsample_size=2, num_aug=3, seed=0)
    train, test = read_split(out, "train"), read_split(out, "test")
    assert train.inputs.shape == (2 * 4, 81) and len(train.group_indices) == 3
    assert test.inputs.shape == (1, 81)
    np.testing.assert_array_equal(test.inputs[0] - 1, _grid(PUZZLE_9).reshape(-1))
    np.testing.assert_array_equal(test.labels[0] - 1, _grid(SOLUTION_9).reshape(-1))
    for inputs, labels in zip(train.inputs.astype(int) - 1, train.labels.astype(int) - 1):
        assert is_valid_solution(labels.reshape(9, 9))
        np.testing.assert_array_equal(inputs[inputs != 0], labels[inputs != 0])


@pytest.mark.parametrize(
    ("question", "answer", "message"),
    [
        (PUZZLE_9[:80], SOLUTION_9, "question has 80 characters"),
        (PUZZLE_9, SOLUTION_9[:80], "answer has 80 characters"),
        (PUZZLE_9[:-1] + "x", SOLUTION_9, "question has 'x' at position 80"),
        (PUZZLE_9[:-1] + "\u00b2", SOLUTION_9, "question has '\u00b2' at position 80"),
        (PUZZLE_9, SOLUTION_9[:-1] + ".", "answer has '.'"),
        ("1" + PUZZLE_9[1:], SOLUTION_9, "disagree on a given at row 0, column 0"),
        (PUZZLE_9, SOLUTION_9[1] + SOLUTION_9[0] + SOLUTION_9[2:], "not a valid solution"),
    ],
)
def test_sudoku_csv_rejects_malformed_rows(tmp_path: Path, question: str, answer: str, message: str) -> None:
    path = _write_csv(tmp_path / "bad.csv", [(PUZZLE_9, SOLUTION_9), (question, answer)])
    with pytest.raises(DatasetError, match=message) as error:
        read_sudoku_csv(path)
    assert str(path) in str(error.value) and "row 2" in str(error.value)


def test_sudoku_csv_rejects_bad_files(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not found"):
        read_sudoku_csv(tmp_path / "missing.csv")
    with pytest.raises(DatasetError, match="header"):
        read_sudoku_csv(_write_csv(tmp_path / "h.csv", [(PUZZLE_9, SOLUTION_9)], header="q,a"))
    extra_field = tmp_path / "f.csv"
    extra_field.write_text(f"source,question,answer,rating\nx,{PUZZLE_9},{SOLUTION_9},0,extra\n")
    with pytest.raises(DatasetError, match="5 fields"):
        read_sudoku_csv(extra_field)
    good = _write_csv(tmp_path / "good.csv", [(PUZZLE_9, SOLUTION_9)])
    with pytest.raises(DatasetError, match="subsample-size 5"):
        build_sudoku_from_csv(tmp_path / "out", good, subsample_size=5)
    assert not (tmp_path / "out").exists()


def test_shortest_path_and_path_counting_on_hand_made_grids() -> None:
    assert count_shortest_paths(_maze(TWO_ROUTES)) == 2
    maze = _maze(["S  ", "## ", "G  "])
    assert shortest_path(maze) == [(0, 0), (0, 1), (0, 2), (1, 2), (2, 2), (2, 1), (2, 0)]
    assert count_shortest_paths(maze) == 1
    assert shortest_path(_maze(["S#", "#G"])) is None
    assert count_shortest_paths(_maze(["S#", "#G"])) == 0


@pytest.mark.parametrize(("size", "min_length", "openings"), [(5, 5, 0), (12, 25, 0), (12, 25, 8), (30, 112, 0)])
def test_generated_maze_has_a_unique_long_enough_shortest_path(size: int, min_length: int, openings: int) -> None:
    rng = np.random.default_rng(size + openings)
    for _ in range(3):
        maze, answer = generate_maze(size, min_length, rng, extra_openings=openings)
        assert maze.shape == answer.shape == (size, size)
        assert set(np.unique(maze)) <= set("# SG") and set(np.unique(answer)) <= set(CHARSET)
        path = shortest_path(maze)
        assert path is not None and len(path) >= min_length
        assert count_shortest_paths(maze) == 1
        np.testing.assert_array_equal(answer, mark_path(maze, path))
        assert np.count_nonzero(answer == "o") == len(path) - 2


def test_generate_maze_rejects_impossible_requests() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="longest seen"):
        generate_maze(5, 100, rng, max_attempts=3)
    with pytest.raises(ValueError, match="size"):
        generate_maze(31, 10, rng)


def test_dihedral_transforms_are_the_8_symmetries_and_keep_the_answer() -> None:
    maze, answer = generate_maze(7, 8, np.random.default_rng(2))
    images = {dihedral(maze, t).tobytes() for t in range(8)}
    assert len(images) == 8  # this (seeded) maze has no symmetry, so all 8 images differ
    for t in range(8):
        np.testing.assert_array_equal(dihedral(answer, t), mark_path(dihedral(maze, t), shortest_path(dihedral(maze, t))))


def test_build_generated_maze_writes_a_consistent_dataset(tmp_path: Path) -> None:
    out = build_generated_maze(tmp_path / "m", size=9, num_train=12, num_test=6, min_path_length=12, seed=1, num_aug=3, progress=False)
    metadata = read_metadata(out)
    assert (metadata.kind, metadata.seq_len, metadata.vocab_size, metadata.grid_shape) == ("maze", 81, 6, (9, 9))
    train, test = read_split(out, "train"), read_split(out, "test")
    assert train.inputs.shape == (48, 81) and test.inputs.shape == (6, 81)
    decode = np.array(["?"] + list(CHARSET))
    for split in (train, test):
        for inputs, labels in zip(split.inputs, split.labels):
            maze, answer = decode[inputs].reshape(9, 9), decode[labels].reshape(9, 9)
            path = shortest_path(maze)
            assert len(path) >= 12 and count_shortest_paths(maze) == 1
            np.testing.assert_array_equal(answer, mark_path(maze, path))
    originals = {row.tobytes() for row in train.inputs[train.group_indices[:-1]]}
    assert originals.isdisjoint(row.tobytes() for row in test.inputs)


def test_maze_csv_import(tmp_path: Path) -> None:
    maze = _maze(MAZE_5)
    answer = mark_path(maze, shortest_path(maze))
    question_text, answer_text = "".join(maze.reshape(-1)), "".join(answer.reshape(-1))
    assert answer_text.count("o") == 11
    train_csv = _write_csv(tmp_path / "train.csv", [(question_text, answer_text)] * 2)
    test_csv = _write_csv(tmp_path / "test.csv", [(question_text, answer_text)])
    out = build_maze_from_csv(tmp_path / "ds", train_csv, test_csv, num_aug=7, seed=0)
    train = read_split(out, "train")
    assert train.inputs.shape == (16, 25) and list(train.group_indices) == [0, 8, 16]
    assert len({row.tobytes() for row in train.inputs[:8]}) == 8  # the 8 dihedral images of an asymmetric maze
    assert read_metadata(out).grid_shape == (5, 5)
    with pytest.raises(ValueError, match="num_aug"):
        build_maze_from_csv(tmp_path / "ds2", train_csv, num_aug=8)


@pytest.mark.parametrize(
    ("question", "answer", "message"),
    [
        ("S   ##", "S   ##", "6 characters; expected n\\*n"),
        (MAZE_5_TEXT[:24], MAZE_5_TEXT[:24], "24 characters; expected n\\*n"),
        (MAZE_5_TEXT, "", "answer has 0 characters"),
        (MAZE_5_TEXT[:14] + "X" + MAZE_5_TEXT[15:], MAZE_5_TEXT, "question has 'X' at position 14"),
        ("SS" + MAZE_5_TEXT[2:], "SS" + MAZE_5_TEXT[2:], "2 'S' cells"),
        (MAZE_5_TEXT.replace("G", " "), MAZE_5_TEXT.replace("G", " "), "0 'G' cells"),
    ],
)
def test_maze_csv_rejects_malformed_rows(tmp_path: Path, question: str, answer: str, message: str) -> None:
    path = _write_csv(tmp_path / "bad.csv", [(question, answer)])
    with pytest.raises(DatasetError, match=message) as error:
        read_maze_csv(path)
    assert str(path) in str(error.value) and "row 1" in str(error.value)


def test_maze_csv_rejects_wrong_answers(tmp_path: Path) -> None:
    maze = _maze(MAZE_5)
    question = "".join(maze.reshape(-1))
    good = "".join(mark_path(maze, shortest_path(maze)).reshape(-1))
    broken_path = good.replace("o", " ", 1)
    wall_changed = "." + good[1:]
    two_routes = "".join(_maze(TWO_ROUTES).reshape(-1))
    open_maze = _maze(["S   ", "# # ", "    ", "#  G"])
    path_through_wall = _maze(["Sooo", "# #o", "ooo ", "o##G"])
    cases = [
        (question, broken_path, "do not join S to G"),
        (question, wall_changed, "answer has '.'"),
        (two_routes, "".join(_maze(["Sooo", " ##o", " ##o", "   G"]).reshape(-1)), None),
        (two_routes, "".join(_maze(["Sooo", " ##o", " ##o", "  oG"]).reshape(-1)), "marks 8 path cells but the shortest path has 7"),
        ("".join(open_maze.reshape(-1)), "".join(path_through_wall.reshape(-1)), "disagree at row 3, column 0"),
        ("S#  ## #  # ###G", "S#  ## #  # ###G", "cannot be reached"),
    ]
    for index, (q, a, message) in enumerate(cases):
        path = _write_csv(tmp_path / f"case{index}.csv", [(q, a)])
        if message is None:
            assert len(read_maze_csv(path)) == 1  # either of two equally short paths is a valid answer
        else:
            with pytest.raises(DatasetError, match=message):
                read_maze_csv(path)
    with pytest.raises(DatasetError, match="not found"):
        read_maze_csv(tmp_path / "missing.csv")
