"""Build a Maze dataset: import the Maze-Hard CSV files, or generate mazes with a unique shortest path.

Import (the reference TRM recipe)::

    python -m dataset.build_maze_dataset --output-dir data/maze-30x30-hard-1k \\
        --input-csv train.csv --test-csv test.csv --num-aug 7

Generate (no download; ``--min-path-length`` is the hardness knob)::

    python -m dataset.build_maze_dataset --output-dir data/maze12 --generate --size 12 \\
        --min-path-length 20 --num-train 1000 --num-test 100 --seed 0

A maze is an ``n x n`` grid of characters: ``#`` wall, space open, ``S`` start, ``G`` goal; the answer
is the maze with the cells of the shortest path from S to G (S and G excluded) marked ``o``. A path's
*length* counts its cells, S and G included. Tokens: pad 0, ``#`` 1, space 2, ``S`` 3, ``G`` 4, ``o`` 5
(vocabulary 6); one maze per example; a group holds a maze and its dihedral augmentations; every
puzzle has the blank identifier 0.

Generated mazes are perfect mazes (a random spanning tree of a lattice of cells, carved by a
randomised depth-first search), so S and G are joined by exactly one simple path; optional extra
openings add loops, each kept only if the shortest path stays unique and long enough.
"""

from __future__ import annotations

import argparse
import csv
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dataset.cli import csv_or_generate_parser, csv_provenance, parse_csv_or_generate, run_build
from dataset.common import BLANK_IDENTIFIER, DatasetError, DatasetMetadata, SplitArrays, write_dataset

WALL, OPEN, START, GOAL, PATH = "#", " ", "S", "G", "o"
CHARSET = WALL + OPEN + START + GOAL + PATH
"""Token of a character = its index here + 1 (token 0 is padding)."""
VOCAB_SIZE = len(CHARSET) + 1
CSV_HEADER = ("source", "question", "answer", "rating")
MAX_GENERATED_SIZE = 30
NUM_DIHEDRAL = 8

Cell = tuple[int, int]


# --------------------------------------------------------------------------------------------------
# Breadth-first search
# --------------------------------------------------------------------------------------------------


def _find_unique(grid: np.ndarray, char: str) -> Cell:
    found = np.argwhere(grid == char)
    if len(found) != 1:
        raise ValueError(f"a maze needs exactly one {char!r}, found {len(found)}")
    return int(found[0][0]), int(found[0][1])


def _bfs(grid: np.ndarray, source: Cell, passable: np.ndarray | None = None) -> np.ndarray:
    """Distances (in steps) from ``source`` over non-wall cells; -1 where unreachable."""
    passable = grid != WALL if passable is None else passable
    rows, cols = grid.shape
    distance = np.full(grid.shape, -1, dtype=np.int64)
    distance[source] = 0
    queue = deque([source])
    while queue:
        r, c = queue.popleft()
        step = distance[r, c] + 1
        for nr, nc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
            if 0 <= nr < rows and 0 <= nc < cols and passable[nr, nc] and distance[nr, nc] < 0:
                distance[nr, nc] = step
                queue.append((nr, nc))
    return distance


def _neighbours(cell: Cell, shape: tuple[int, int]) -> list[Cell]:
    r, c = cell
    return [(nr, nc) for nr, nc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)) if 0 <= nr < shape[0] and 0 <= nc < shape[1]]


def shortest_path(grid: np.ndarray) -> list[Cell] | None:
    """A shortest path from ``S`` to ``G`` through non-wall cells (both ends included), or ``None``."""
    start, goal = _find_unique(grid, START), _find_unique(grid, GOAL)
    distance = _bfs(grid, goal)
    if distance[start] < 0:
        return None
    path = [start]
    while path[-1] != goal:
        here = distance[path[-1]]
        path.append(next(n for n in _neighbours(path[-1], grid.shape) if distance[n] == here - 1))
    return path


def count_shortest_paths(grid: np.ndarray, limit: int = 2) -> int:
    """Number of distinct shortest S-to-G paths, capped at ``limit`` (0 when G is unreachable)."""
    start, goal = _find_unique(grid, START), _find_unique(grid, GOAL)
    from_start = _bfs(grid, start)
    length = from_start[goal]
    if length < 0:
        return 0
    ways = np.zeros(grid.shape, dtype=np.int64)
    ways[start] = 1
    order = np.argwhere(from_start >= 0)
    order = order[np.argsort(from_start[from_start >= 0], kind="stable")]
    for r, c in order:
        if from_start[r, c] == 0:
            continue
        total = sum(int(ways[n]) for n in _neighbours((r, c), grid.shape) if from_start[n] == from_start[r, c] - 1)
        ways[r, c] = min(total, limit)
    return int(ways[goal])


def mark_path(grid: np.ndarray, path: Sequence[Cell]) -> np.ndarray:
    """The answer grid: ``grid`` with the path's inner cells set to ``o``."""
    answer = grid.copy()
    for cell in path[1:-1]:
        answer[cell] = PATH
    return answer


# --------------------------------------------------------------------------------------------------
# Generator
# --------------------------------------------------------------------------------------------------


def _carve_perfect_maze(size: int, rng: np.random.Generator) -> np.ndarray:
    """A spanning-tree maze on the lattice of even coordinates (randomised depth-first search)."""
    grid = np.full((size, size), WALL, dtype="<U1")
    lattice = (size + 1) // 2
    visited = np.zeros((lattice, lattice), dtype=bool)
    start = (int(rng.integers(lattice)), int(rng.integers(lattice)))
    visited[start] = True
    grid[2 * start[0], 2 * start[1]] = OPEN
    stack = [start]
    while stack:
        r, c = stack[-1]
        options = [
            (nr, nc) for nr, nc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)) if 0 <= nr < lattice and 0 <= nc < lattice and not visited[nr, nc]
        ]
        if not options:
            stack.pop()
            continue
        nr, nc = options[int(rng.integers(len(options)))]
        visited[nr, nc] = True
        grid[2 * nr, 2 * nc] = OPEN
        grid[r + nr, c + nc] = OPEN  # the wall between the two lattice cells
        stack.append((nr, nc))
    return grid


def _place_endpoints(grid: np.ndarray, min_path_length: int, rng: np.random.Generator, tries: int = 8) -> int:
    """Put S and G on open cells at least ``min_path_length`` cells apart; return the longest length seen."""
    open_cells = np.argwhere(grid == OPEN)
    longest = 0
    for _ in range(tries):
        row, col = (int(x) for x in open_cells[rng.integers(len(open_cells))])
        start = (row, col)
        distance = _bfs(grid, start)
        longest = max(longest, int(distance.max()) + 1)
        candidates = np.argwhere(distance + 1 >= max(min_path_length, 2))
        if len(candidates):
            goal = tuple(int(x) for x in candidates[rng.integers(len(candidates))])
            grid[start] = START
            grid[goal] = GOAL
            return longest
    return longest


def _add_loops(grid: np.ndarray, openings: int, min_path_length: int, rng: np.random.Generator) -> None:
    """Open up to ``openings`` walls between lattice cells, keeping only those that keep the answer unique."""
    rows, cols = grid.shape
    walls = [
        (r, c)
        for r in range(rows)
        for c in range(cols)
        if grid[r, c] == WALL and (r % 2 == 0 and c % 2 == 1 and c + 1 < cols or r % 2 == 1 and c % 2 == 0 and r + 1 < rows)
    ]
    for index in rng.permutation(len(walls))[:openings]:
        cell = walls[index]
        grid[cell] = OPEN
        path = shortest_path(grid)
        if path is None or len(path) < min_path_length or count_shortest_paths(grid) != 1:
            grid[cell] = WALL


def generate_maze(
    size: int,
    min_path_length: int,
    rng: np.random.Generator,
    extra_openings: int = 0,
    max_attempts: int = 50,
) -> tuple[np.ndarray, np.ndarray]:
    """Generate ``(maze, answer)`` character grids of ``size x size`` with a unique shortest path.

    The shortest S-to-G path has at least ``min_path_length`` cells (S and G included). Raises
    ``ValueError`` when no maze of that size reaches the length in ``max_attempts`` tries.
    """
    if not 3 <= size <= MAX_GENERATED_SIZE:
        raise ValueError(f"maze size must be in [3, {MAX_GENERATED_SIZE}], got {size}")
    if min_path_length < 2 or extra_openings < 0:
        raise ValueError(f"need min_path_length >= 2 and extra_openings >= 0, got {min_path_length}, {extra_openings}")
    longest = 0
    for _ in range(max_attempts):
        grid = _carve_perfect_maze(size, rng)
        longest = max(longest, _place_endpoints(grid, min_path_length, rng))
        if np.count_nonzero(grid == START) == 0:
            continue
        if extra_openings:
            _add_loops(grid, extra_openings, min_path_length, rng)
        path = shortest_path(grid)
        assert path is not None and len(path) >= min_path_length
        return grid, mark_path(grid, path)
    raise ValueError(
        f"no {size}x{size} maze with a shortest path of {min_path_length} cells in {max_attempts} tries "
        f"(longest seen: {longest}); lower min_path_length or raise size"
    )


def dihedral(grid: np.ndarray, transform: int) -> np.ndarray:
    """One of the 8 symmetries of the square: ``transform % 4`` quarter turns, then a flip if ``>= 4``."""
    result = np.rot90(grid, transform % 4)
    return np.ascontiguousarray(np.fliplr(result) if transform >= 4 else result)


# --------------------------------------------------------------------------------------------------
# Dataset assembly
# --------------------------------------------------------------------------------------------------


@dataclass
class MazePair:
    question: np.ndarray  # [n, n] characters
    answer: np.ndarray


def encode_maze(grid: np.ndarray) -> np.ndarray:
    """Characters -> tokens (``CHARSET`` index + 1), flattened."""
    lookup = {char: index + 1 for index, char in enumerate(CHARSET)}
    return np.array([lookup[char] for char in grid.reshape(-1)], dtype=np.uint8)


def _with_augmentations(pairs: list[MazePair], num_aug: int, rng: np.random.Generator) -> list[list[MazePair]]:
    if not 0 <= num_aug < NUM_DIHEDRAL:
        raise ValueError(f"num_aug must be in [0, {NUM_DIHEDRAL - 1}] (the non-identity dihedral transforms), got {num_aug}")
    groups = []
    for pair in pairs:
        transforms = rng.permutation(np.arange(1, NUM_DIHEDRAL))[:num_aug]
        groups.append([pair] + [MazePair(dihedral(pair.question, t), dihedral(pair.answer, t)) for t in transforms])
    return groups


def _encode_split(groups: list[list[MazePair]]) -> SplitArrays:
    pairs = [pair for group in groups for pair in group]
    return SplitArrays(
        inputs=np.stack([encode_maze(pair.question) for pair in pairs]),
        labels=np.stack([encode_maze(pair.answer) for pair in pairs]),
        puzzle_identifiers=np.zeros(len(pairs), dtype=np.int32),
        puzzle_indices=np.arange(len(pairs) + 1, dtype=np.int32),
        group_indices=np.concatenate([[0], np.cumsum([len(group) for group in groups])]).astype(np.int32),
    )


def _write_maze(
    output_dir: str | Path,
    size: int,
    train_groups: list[list[MazePair]],
    test_pairs: list[MazePair] | None,
    builder: dict[str, object],
    overwrite: bool,
) -> Path:
    metadata = DatasetMetadata(
        kind="maze",
        seq_len=size * size,
        vocab_size=VOCAB_SIZE,
        num_puzzle_identifiers=1,
        grid_shape=(size, size),
        builder=builder,
    )
    splits = {"train": _encode_split(train_groups)}
    if test_pairs is not None:
        splits["test"] = _encode_split([[pair] for pair in test_pairs])
    return write_dataset(output_dir, metadata, splits, [BLANK_IDENTIFIER], overwrite=overwrite)


def _check_output_dir(output_dir: str | Path, overwrite: bool) -> None:
    if Path(output_dir).exists() and not overwrite:
        raise DatasetError(f"{output_dir} already exists; choose another --output-dir or pass --overwrite")


def build_generated_maze(
    output_dir: str | Path,
    size: int = 12,
    num_train: int = 1000,
    num_test: int = 100,
    min_path_length: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
    num_aug: int = 0,
    extra_openings: int = 0,
    progress: bool = True,
) -> Path:
    """Generate distinct mazes (no test maze appears in train) and write them as a dataset; return its path.

    ``min_path_length`` defaults to ``size * size // 8`` cells (112 for 30x30, like Maze-Hard's > 110).
    """
    if num_train < 1 or num_test < 0:
        raise ValueError(f"need num_train >= 1 and num_test >= 0, got {num_train}, {num_test}")
    min_path_length = max(2, size * size // 8) if min_path_length is None else min_path_length
    _with_augmentations([], num_aug, np.random.default_rng(0))  # validates num_aug before any work
    _check_output_dir(output_dir, overwrite)
    rng = np.random.default_rng(seed)
    wanted = num_train + num_test
    seen: set[bytes] = set()
    pairs: list[MazePair] = []
    draws = 0
    with tqdm(total=wanted, desc=f"generate {size}x{size} maze", disable=not progress) as bar:
        while len(pairs) < wanted:
            if draws >= 20 * wanted:
                raise DatasetError(f"found only {len(pairs)} distinct {size}x{size} mazes in {draws} draws, {wanted} asked")
            draws += 1
            question, answer = generate_maze(size, min_path_length, rng, extra_openings=extra_openings)
            key = question.tobytes()
            if key not in seen:
                seen.add(key)
                pairs.append(MazePair(question, answer))
                bar.update(1)
    lengths = np.array([np.count_nonzero(pair.answer == PATH) + 2 for pair in pairs])
    builder = {
        "source": "generated",
        "size": size,
        "num_train": num_train,
        "num_test": num_test,
        "min_path_length": min_path_length,
        "extra_openings": extra_openings,
        "num_aug": num_aug,
        "seed": seed,
        "path_length_found": {"min": int(lengths.min()), "mean": float(lengths.mean()), "max": int(lengths.max())},
    }
    train_groups = _with_augmentations(pairs[:num_train], num_aug, rng)
    return _write_maze(output_dir, size, train_groups, pairs[num_train:] if num_test else None, builder, overwrite)


# --------------------------------------------------------------------------------------------------
# CSV import
# --------------------------------------------------------------------------------------------------


def _check_row(question: str, answer: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Validate one row; return the grids or raise ``ValueError`` describing the problem."""
    if len(answer) != len(question):
        raise ValueError(f"answer has {len(answer)} characters, question {len(question)}")
    for column, text, allowed in (("question", question, WALL + OPEN + START + GOAL), ("answer", answer, CHARSET)):
        bad = next((i for i, char in enumerate(text) if char not in allowed), None)
        if bad is not None:
            raise ValueError(f"{column} has {text[bad]!r} at position {bad}; accepted characters: {list(allowed)}")
    grid = np.array(list(question), dtype="<U1").reshape(size, size)
    solved = np.array(list(answer), dtype="<U1").reshape(size, size)
    for char in (START, GOAL):
        count = int(np.count_nonzero(grid == char))
        if count != 1:
            raise ValueError(f"question has {count} {char!r} cells, expected exactly 1")
    differs = np.argwhere((grid != solved) & ~((solved == PATH) & (grid == OPEN)))
    if len(differs):
        r, c = differs[0]
        raise ValueError(f"question and answer disagree at row {r}, column {c} ({grid[r, c]!r} vs {solved[r, c]!r})")
    best = shortest_path(grid)
    if best is None:
        raise ValueError("the goal cannot be reached from the start")
    on_path = (solved == PATH) | (solved == START) | (solved == GOAL)
    reached = _bfs(solved, _find_unique(solved, START), passable=on_path)
    if reached[_find_unique(solved, GOAL)] < 0:
        raise ValueError("the answer's 'o' cells do not join S to G")
    if np.count_nonzero(on_path) != len(best):
        raise ValueError(f"the answer marks {np.count_nonzero(on_path)} path cells but the shortest path has {len(best)}")
    return grid, solved


def read_maze_csv(path: str | Path) -> list[MazePair]:
    """Read a Maze-Hard style CSV (``source,question,answer,rating``) and validate every row.

    Raises :class:`DatasetError` naming the file, the row and the problem for any malformed row:
    wrong field count or length, bad characters, disagreeing question/answer, or an answer that is
    not a shortest S-to-G path.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: CSV file not found (expected a header {','.join(CSV_HEADER)})")
    pairs: list[MazePair] = []
    size: int | None = None
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None or [name.strip() for name in header[:4]] != list(CSV_HEADER):
            raise DatasetError(f"{path}: header is {header}, expected {','.join(CSV_HEADER)}")
        for row_number, row in enumerate(reader, start=1):
            if not row:
                continue
            where = f"{path}, row {row_number} (line {reader.line_num})"
            if len(row) != len(CSV_HEADER):
                raise DatasetError(f"{where}: {len(row)} fields, expected {len(CSV_HEADER)} ({','.join(CSV_HEADER)})")
            question, answer = row[1], row[2]
            row_size = math.isqrt(len(question))
            if row_size < 2 or row_size * row_size != len(question):
                raise DatasetError(f"{where}: question has {len(question)} characters; expected n*n for a square maze")
            if size is None:
                size = row_size
            elif row_size != size:
                raise DatasetError(f"{where}: a {row_size}x{row_size} maze in a file of {size}x{size} mazes")
            try:
                pairs.append(MazePair(*_check_row(question, answer, size)))
            except ValueError as error:
                raise DatasetError(f"{where}: {error}") from error
    if not pairs:
        raise DatasetError(f"{path}: no mazes after the header")
    return pairs


def build_maze_from_csv(
    output_dir: str | Path,
    input_csv: str | Path,
    test_csv: str | Path | None = None,
    subsample_size: int | None = None,
    num_aug: int = 0,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Import Maze-Hard CSV files (train, optional test) and write them as a dataset."""
    _with_augmentations([], num_aug, np.random.default_rng(0))  # validates num_aug before any work
    _check_output_dir(output_dir, overwrite)
    train_pairs = read_maze_csv(input_csv)
    test_pairs = read_maze_csv(test_csv) if test_csv is not None else None
    size = train_pairs[0].question.shape[0]
    if test_pairs is not None and test_pairs[0].question.shape[0] != size:
        raise DatasetError(f"{test_csv}: {test_pairs[0].question.shape[0]}x mazes, but {input_csv} holds {size}x mazes")
    rng = np.random.default_rng(seed)
    if subsample_size is not None:
        if not 1 <= subsample_size <= len(train_pairs):
            raise DatasetError(f"--subsample-size {subsample_size}: {input_csv} has {len(train_pairs)} rows; accepted 1..{len(train_pairs)}")
        chosen = np.sort(rng.choice(len(train_pairs), size=subsample_size, replace=False))
        train_pairs = [train_pairs[index] for index in chosen]
    builder = csv_provenance(input_csv, test_csv, subsample_size, num_aug, seed)
    train_groups = _with_augmentations(train_pairs, num_aug, rng)
    return _write_maze(output_dir, size, train_groups, test_pairs, builder, overwrite)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser, generated = csv_or_generate_parser(
        __doc__.split("\n\n")[0],
        puzzle="mazes with a unique shortest path",
        csv_name="Maze-Hard",
        num_aug_help="extra dihedral copies per train maze (0-7)",
    )
    generated.add_argument("--size", type=int, default=12, help=f"grid side, 3..{MAX_GENERATED_SIZE}")
    generated.add_argument("--min-path-length", type=int, help="cells on the shortest path, S and G included (default size*size//8)")
    generated.add_argument("--extra-openings", type=int, default=0, help="walls to try opening into loops")
    generated.add_argument("--num-train", type=int, default=1000)
    generated.add_argument("--num-test", type=int, default=100)
    return parse_csv_or_generate(parser, argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = _parse_args(argv)
    if args.generate:
        build = partial(
            build_generated_maze,
            args.output_dir,
            size=args.size,
            num_train=args.num_train,
            num_test=args.num_test,
            min_path_length=args.min_path_length,
            seed=args.seed,
            overwrite=args.overwrite,
            num_aug=args.num_aug,
            extra_openings=args.extra_openings,
        )
    else:
        build = partial(
            build_maze_from_csv,
            args.output_dir,
            args.input_csv,
            test_csv=args.test_csv,
            subsample_size=args.subsample_size,
            num_aug=args.num_aug,
            seed=args.seed,
            overwrite=args.overwrite,
        )
    run_build(build)


if __name__ == "__main__":
    main()
