"""Build a Sudoku dataset: import the Sudoku-Extreme CSV files, or generate puzzles with a unique solution.

Import (the reference TRM recipe)::

    python -m dataset.build_sudoku_dataset --output-dir data/sudoku-extreme-1k-aug-1000 \\
        --input-csv train.csv --test-csv test.csv --subsample-size 1000 --num-aug 1000

Generate (no download; ``--size`` 4, 6 or 9 with boxes 2x2, 2x3, 3x3; fewer givens = harder)::

    python -m dataset.build_sudoku_dataset --output-dir data/sudoku4x4 --generate --size 4 \\
        --num-train 2000 --num-test 200 --min-givens 5 --max-givens 8 --seed 0

Encoding (see :mod:`dataset.common` for the folder format): a grid of ``size x size`` digits, blank = 0,
becomes ``size * size`` tokens ``digit + 1`` (so blanks are token 1 and token 0 is padding); the label
is the solved grid in the same encoding. The vocabulary is 11 tokens for every size so that one model
can be shared across sizes. One puzzle per example; a group holds an original puzzle and its
augmentations; every puzzle has the blank identifier 0.

The generator is also a library: :func:`generate_sudoku`, :func:`count_solutions`,
:func:`is_valid_solution`, :func:`augment_sudoku` (and ``augment_sudoku_batch``) and
:func:`build_generated_sudoku`.
"""

from __future__ import annotations

import argparse
import csv
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dataset.cli import csv_or_generate_parser, csv_provenance, parse_csv_or_generate, run_build
from dataset.common import BLANK_IDENTIFIER, DatasetError, DatasetMetadata, SplitArrays, write_dataset

BOX_SHAPES: dict[int, tuple[int, int]] = {4: (2, 2), 6: (2, 3), 9: (3, 3)}
"""Supported grid sizes -> (rows, cols) of one box."""

VOCAB_SIZE = 11
"""Token 0 is padding, token 1 a blank cell, tokens 2..10 the digits 1..9 (shared by every size)."""

CSV_HEADER = ("source", "question", "answer", "rating")
BLANK_CHARACTERS = ".0"


# --------------------------------------------------------------------------------------------------
# Exact solver: bitmask backtracking, most-constrained empty cell first.
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Geometry:
    """Per-size lookup tables of the solver: for every cell its row, column and box."""

    size: int
    row_of: tuple[int, ...]
    col_of: tuple[int, ...]
    box_of: tuple[int, ...]
    full_mask: int
    popcount: tuple[int, ...]


def _make_geometry(size: int) -> _Geometry:
    box_rows, box_cols = BOX_SHAPES[size]
    cells = range(size * size)
    return _Geometry(
        size=size,
        row_of=tuple(cell // size for cell in cells),
        col_of=tuple(cell % size for cell in cells),
        box_of=tuple((cell // size // box_rows) * (size // box_cols) + (cell % size) // box_cols for cell in cells),
        full_mask=(1 << size) - 1,
        popcount=tuple(bin(mask).count("1") for mask in range(1 << size)),
    )


_GEOMETRIES: dict[int, _Geometry] = {size: _make_geometry(size) for size in BOX_SHAPES}


def _check_size(size: int) -> None:
    if size not in BOX_SHAPES:
        raise ValueError(f"sudoku size {size} is not supported; choose one of {sorted(BOX_SHAPES)}")


class _Search:
    """One backtracking search over a flat grid (0 = blank). Not reusable across grids."""

    def __init__(self, cells: list[int], size: int, shuffle: random.Random | None = None) -> None:
        self.geometry = _GEOMETRIES[size]
        self.cells = cells
        self.shuffle = shuffle
        self.rows = [0] * size
        self.cols = [0] * size
        self.boxes = [0] * size
        self.consistent = True
        self.empties: list[int] = []
        self.first_solution: list[int] | None = None
        g = self.geometry
        for cell, digit in enumerate(cells):
            if digit == 0:
                self.empties.append(cell)
                continue
            bit = 1 << (digit - 1)
            r, c, b = g.row_of[cell], g.col_of[cell], g.box_of[cell]
            if (self.rows[r] | self.cols[c] | self.boxes[b]) & bit:
                self.consistent = False
            self.rows[r] |= bit
            self.cols[c] |= bit
            self.boxes[b] |= bit

    def count(self, limit: int) -> int:
        """Number of solutions, stopping once ``limit`` are found."""
        if not self.consistent or limit <= 0:
            return 0
        return self._count(limit)

    def _count(self, limit: int) -> int:
        g = self.geometry
        rows, cols, boxes, empties = self.rows, self.cols, self.boxes, self.empties
        row_of, col_of, box_of, popcount, full = g.row_of, g.col_of, g.box_of, g.popcount, g.full_mask
        if not empties:
            if self.first_solution is None:
                self.first_solution = list(self.cells)
            return 1
        best_position, best_mask, best_count = -1, 0, 99
        for position, cell in enumerate(empties):
            mask = full & ~(rows[row_of[cell]] | cols[col_of[cell]] | boxes[box_of[cell]])
            count = popcount[mask]
            if count < best_count:
                if count == 0:
                    return 0
                best_position, best_mask, best_count = position, mask, count
                if count == 1:
                    break
        cell = empties[best_position]
        empties[best_position] = empties[-1]
        empties.pop()
        r, c, b = row_of[cell], col_of[cell], box_of[cell]
        bits = [1 << shift for shift in range(g.size) if best_mask >> shift & 1]
        if self.shuffle is not None:
            self.shuffle.shuffle(bits)
        found = 0
        for bit in bits:
            rows[r] |= bit
            cols[c] |= bit
            boxes[b] |= bit
            self.cells[cell] = bit.bit_length()
            found += self._count(limit - found)
            rows[r] ^= bit
            cols[c] ^= bit
            boxes[b] ^= bit
            if found >= limit:
                break
        self.cells[cell] = 0
        empties.append(cell)
        empties[best_position], empties[-1] = empties[-1], empties[best_position]
        return found


def _as_flat_grid(grid: np.ndarray | Sequence[Sequence[int]]) -> tuple[list[int], int]:
    array = np.asarray(grid)
    if array.ndim != 2 or array.shape[0] != array.shape[1]:
        raise ValueError(f"a sudoku grid must be square, got shape {array.shape}")
    size = array.shape[0]
    _check_size(size)
    if array.size and (array.min() < 0 or array.max() > size):
        raise ValueError(f"a {size}x{size} sudoku holds digits 0 (blank) to {size}, got [{array.min()}, {array.max()}]")
    return [int(value) for value in array.reshape(-1)], size


def count_solutions(grid: np.ndarray | Sequence[Sequence[int]], limit: int = 2) -> int:
    """Count the completions of ``grid`` (0 = blank), stopping at ``limit``; 0 if the givens clash."""
    cells, size = _as_flat_grid(grid)
    return _Search(cells, size).count(limit)


def solve_sudoku(grid: np.ndarray | Sequence[Sequence[int]]) -> np.ndarray | None:
    """One completion of ``grid`` (the unique one for a proper puzzle), or ``None`` if unsolvable."""
    cells, size = _as_flat_grid(grid)
    search = _Search(cells, size)
    if search.count(1) == 0 or search.first_solution is None:
        return None
    return np.array(search.first_solution, dtype=np.int64).reshape(size, size)


def valid_solutions(grids: np.ndarray) -> np.ndarray:
    """For a stack ``[N, size, size]`` of grids, whether each is a complete, rule-abiding solution."""
    grids = np.asarray(grids)
    count, size = grids.shape[0], grids.shape[1]
    box_rows, box_cols = BOX_SHAPES[size]
    digits = np.arange(1, size + 1)
    boxes = grids.reshape(count, size // box_rows, box_rows, size // box_cols, box_cols).transpose(0, 1, 3, 2, 4)
    units = np.concatenate([grids, grids.transpose(0, 2, 1), boxes.reshape(count, size, size)], axis=1)
    return np.all(np.sort(units, axis=2) == digits, axis=(1, 2))


def is_valid_solution(grid: np.ndarray | Sequence[Sequence[int]]) -> bool:
    """Whether ``grid`` is a completely filled grid with every digit once per row, column and box."""
    array = np.asarray(grid)
    if array.ndim != 2 or array.shape[0] != array.shape[1] or array.shape[0] not in BOX_SHAPES:
        return False
    return bool(valid_solutions(array[None])[0])


# --------------------------------------------------------------------------------------------------
# Generator
# --------------------------------------------------------------------------------------------------


def random_solution(size: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly shuffled search's first complete grid of the given size."""
    _check_size(size)
    search = _Search([0] * (size * size), size, shuffle=random.Random(int(rng.integers(2**63))))
    search.count(1)
    assert search.first_solution is not None  # an empty grid always has a solution
    return np.array(search.first_solution, dtype=np.int64).reshape(size, size)


def _has_other_solution(cells: list[int], size: int, cell: int, excluded_digit: int) -> bool:
    """Whether ``cells`` (with ``cells[cell]`` blank) has a solution whose ``cell`` is not ``excluded_digit``."""
    for digit in range(1, size + 1):
        if digit == excluded_digit:
            continue
        cells[cell] = digit
        solvable = _Search(list(cells), size).count(1) > 0
        cells[cell] = 0
        if solvable:
            return True
    return False


def _dig_holes(solution: np.ndarray, givens: int, rng: np.random.Generator) -> np.ndarray:
    """Blank cells of ``solution`` in random order while the puzzle keeps a unique solution."""
    size = solution.shape[0]
    cells = [int(value) for value in solution.reshape(-1)]
    remaining = len(cells)
    for cell in rng.permutation(len(cells)):
        if remaining <= givens:
            break
        digit = cells[cell]
        cells[cell] = 0
        if _has_other_solution(cells, size, int(cell), digit):
            cells[cell] = digit
        else:
            remaining -= 1
    return np.array(cells, dtype=np.int64).reshape(size, size)


def generate_sudoku(size: int, givens: int, rng: np.random.Generator, max_attempts: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Generate ``(puzzle, solution)``: a ``size x size`` puzzle (0 = blank) with exactly one solution.

    Clues are removed from a random full grid in random order, keeping a removal only while the
    puzzle stays uniquely solvable, until ``givens`` clues are left. When a grid gets stuck above
    ``givens`` (every remaining clue is needed; likely for 9x9 below ~24 givens), up to
    ``max_attempts`` fresh grids are tried and the sparsest puzzle found is returned, so the result
    has ``givens`` clues when reachable and otherwise as few as were found.
    """
    _check_size(size)
    if not 0 <= givens <= size * size:
        raise ValueError(f"givens must be in [0, {size * size}] for a {size}x{size} sudoku, got {givens}")
    best: tuple[np.ndarray, np.ndarray] | None = None
    for _ in range(max(1, max_attempts)):
        solution = random_solution(size, rng)
        puzzle = _dig_holes(solution, givens, rng)
        if best is None or np.count_nonzero(puzzle) < np.count_nonzero(best[0]):
            best = (puzzle, solution)
        if np.count_nonzero(puzzle) <= givens:
            break
    assert best is not None
    return best


# --------------------------------------------------------------------------------------------------
# Validity-preserving augmentation
# --------------------------------------------------------------------------------------------------


def _random_permutations(count: int, length: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` independent uniform permutations of ``range(length)``, shape ``[count, length]``."""
    return np.argsort(rng.random((count, length)), axis=1)


def _block_permutations(count: int, blocks: int, block_size: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` line orders that permute whole blocks and the lines inside every block."""
    block_order = _random_permutations(count, blocks, rng)  # [count, blocks]
    inner = _random_permutations(count * blocks, block_size, rng).reshape(count, blocks, block_size)
    return (block_order[:, :, None] * block_size + inner).reshape(count, blocks * block_size)


def augment_sudoku_batch(puzzle: np.ndarray, solution: np.ndarray, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``count`` random rule-preserving transforms of one puzzle and its solution, ``[count, size, size]`` each.

    Each copy gets its own digit relabelling, band and stack permutations, row-within-band and
    column-within-stack permutations and (square boxes only) a random transposition; all of these map
    valid grids to valid grids and keep blanks blank.
    """
    size = puzzle.shape[0]
    _check_size(size)
    box_rows, box_cols = BOX_SHAPES[size]
    relabel = np.concatenate([np.zeros((count, 1), dtype=np.int64), _random_permutations(count, size, rng) + 1], axis=1)
    row_orders = _block_permutations(count, size // box_rows, box_rows, rng)
    col_orders = _block_permutations(count, size // box_cols, box_cols, rng)
    transpose = rng.integers(2, size=count).astype(bool) if box_rows == box_cols else np.zeros(count, dtype=bool)

    def transform(grid: np.ndarray) -> np.ndarray:
        moved = grid.astype(np.int64)[row_orders[:, :, None], col_orders[:, None, :]]  # [count, size, size]
        moved = np.take_along_axis(relabel, moved.reshape(count, -1), axis=1).reshape(count, size, size)
        moved[transpose] = moved[transpose].transpose(0, 2, 1)
        return moved

    return transform(puzzle), transform(solution)


def augment_sudoku(puzzle: np.ndarray, solution: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Apply one random symmetry of the sudoku rules to a puzzle and its solution (see :func:`augment_sudoku_batch`)."""
    puzzles, solutions = augment_sudoku_batch(puzzle, solution, 1, rng)
    return puzzles[0], solutions[0]


# --------------------------------------------------------------------------------------------------
# Dataset assembly
# --------------------------------------------------------------------------------------------------


def _with_augmentations(
    puzzles: np.ndarray, solutions: np.ndarray, num_aug: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each puzzle followed by ``num_aug`` augmented copies; returns puzzles, solutions, group sizes."""
    count = len(puzzles)
    group = num_aug + 1
    all_puzzles = np.empty((count * group, *puzzles.shape[1:]), dtype=np.uint8)
    all_solutions = np.empty_like(all_puzzles)
    all_puzzles[::group], all_solutions[::group] = puzzles, solutions
    if num_aug:
        for index in tqdm(range(count), desc="augment", leave=False):
            rows = slice(index * group + 1, (index + 1) * group)
            all_puzzles[rows], all_solutions[rows] = augment_sudoku_batch(puzzles[index], solutions[index], num_aug, rng)
    return all_puzzles, all_solutions, np.full(count, group, dtype=np.int64)


def _encode_split(puzzles: np.ndarray, solutions: np.ndarray, group_sizes: np.ndarray) -> SplitArrays:
    """Puzzles ``[N, size, size]`` (0 = blank) and solutions -> the on-disk arrays (token = digit + 1)."""
    count = len(puzzles)
    return SplitArrays(
        inputs=(puzzles.reshape(count, -1) + 1).astype(np.uint8),
        labels=(solutions.reshape(count, -1) + 1).astype(np.uint8),
        puzzle_identifiers=np.zeros(count, dtype=np.int32),
        puzzle_indices=np.arange(count + 1, dtype=np.int32),
        group_indices=np.concatenate([[0], np.cumsum(group_sizes)]).astype(np.int32),
    )


def _write_sudoku(
    output_dir: str | Path,
    size: int,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray] | None,
    num_aug: int,
    rng: np.random.Generator,
    builder: dict[str, object],
    overwrite: bool,
) -> Path:
    metadata = DatasetMetadata(
        kind="sudoku",
        seq_len=size * size,
        vocab_size=VOCAB_SIZE,
        num_puzzle_identifiers=1,
        grid_shape=(size, size),
        pad_id=0,
        ignore_label_id=0,
        blank_identifier_id=0,
        builder=builder,
    )
    splits = {"train": _encode_split(*_with_augmentations(*train, num_aug, rng))}
    if test is not None:
        splits["test"] = _encode_split(*test, np.ones(len(test[0]), dtype=np.int64))
    return write_dataset(output_dir, metadata, splits, [BLANK_IDENTIFIER], overwrite=overwrite)


def _check_output_dir(output_dir: str | Path, overwrite: bool) -> None:
    if Path(output_dir).exists() and not overwrite:
        raise DatasetError(f"{output_dir} already exists; choose another --output-dir or pass --overwrite")


def _givens_range(size: int, givens: int | None, min_givens: int | None, max_givens: int | None) -> tuple[int, int]:
    """Resolve the difficulty knob into an inclusive ``(low, high)`` range of clue counts."""
    cells = size * size
    if givens is not None:
        if min_givens is not None or max_givens is not None:
            raise ValueError("pass either givens or min_givens/max_givens, not both")
        min_givens = max_givens = givens
    default_low, default_high = {4: (5, 8), 6: (12, 18), 9: (26, 34)}[size]
    low = default_low if min_givens is None else min_givens
    high = max(low, default_high) if max_givens is None else max_givens
    if not 0 <= low <= high <= cells:
        raise ValueError(f"givens range [{low}, {high}] must satisfy 0 <= min <= max <= {cells} for size {size}")
    return low, high


def _distinct_sudokus(
    size: int, wanted: int, low: int, high: int, rng: np.random.Generator, max_attempts: int, progress: bool
) -> tuple[np.ndarray, np.ndarray]:
    """``wanted`` distinct uniquely solvable puzzles (``low``-``high`` givens each) and their solutions."""
    seen: set[bytes] = set()
    puzzles = np.empty((wanted, size, size), dtype=np.uint8)
    solutions = np.empty_like(puzzles)
    found = attempts = 0
    with tqdm(total=wanted, desc=f"generate {size}x{size} sudoku", disable=not progress) as bar:
        while found < wanted:
            if attempts >= max_attempts:
                raise DatasetError(
                    f"found only {found} distinct {size}x{size} sudokus with {low}-{high} givens in {attempts} "
                    f"draws, {wanted} asked; lower num_train/num_test or raise the givens"
                )
            attempts += 1
            puzzle, solution = generate_sudoku(size, int(rng.integers(low, high + 1)), rng)
            key = puzzle.astype(np.uint8).tobytes()
            if key in seen:
                continue
            seen.add(key)
            puzzles[found], solutions[found] = puzzle, solution
            found += 1
            bar.update(1)
    return puzzles, solutions


def build_generated_sudoku(
    output_dir: str | Path,
    size: int = 4,
    num_train: int = 1000,
    num_test: int = 100,
    givens: int | None = None,
    min_givens: int | None = None,
    max_givens: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
    num_aug: int = 0,
    max_attempts_factor: int = 20,
    progress: bool = True,
) -> Path:
    """Generate uniquely solvable sudokus and write them as a dataset; return its path.

    Each puzzle's clue count is drawn uniformly from ``[min_givens, max_givens]`` (or is exactly
    ``givens``); defaults are size-dependent (4x4: 5-8, 6x6: 12-18, 9x9: 26-34). Every puzzle is
    distinct from every other one, so no test puzzle appears in train. Raises :class:`DatasetError`
    when ``num_train + num_test`` distinct puzzles cannot be found in
    ``max_attempts_factor * (num_train + num_test)`` draws (e.g. too many 4x4 puzzles with few givens).
    """
    _check_size(size)
    if num_train < 1 or num_test < 0 or num_aug < 0:
        raise ValueError(f"need num_train >= 1, num_test >= 0, num_aug >= 0; got {num_train}, {num_test}, {num_aug}")
    low, high = _givens_range(size, givens, min_givens, max_givens)
    _check_output_dir(output_dir, overwrite)
    rng = np.random.default_rng(seed)
    wanted = num_train + num_test
    puzzles, solutions = _distinct_sudokus(size, wanted, low, high, rng, max_attempts_factor * wanted, progress)
    clue_counts = np.count_nonzero(puzzles.reshape(wanted, -1), axis=1)
    builder = {
        "source": "generated",
        "size": size,
        "num_train": num_train,
        "num_test": num_test,
        "min_givens": low,
        "max_givens": high,
        "num_aug": num_aug,
        "seed": seed,
        "givens_found": {"min": int(clue_counts.min()), "mean": float(clue_counts.mean()), "max": int(clue_counts.max())},
    }
    train = (puzzles[:num_train], solutions[:num_train])
    test = (puzzles[num_train:], solutions[num_train:]) if num_test else None
    return _write_sudoku(output_dir, size, train, test, num_aug, rng, builder, overwrite)


# --------------------------------------------------------------------------------------------------
# CSV import
# --------------------------------------------------------------------------------------------------

_SIZE_OF_LENGTH = {size * size: size for size in BOX_SHAPES}
_VALIDATION_CHUNK = 65536


def _digit_table(size: int, allow_blank: bool) -> np.ndarray:
    """Byte -> digit lookup (-1 for a character that is not accepted)."""
    table = np.full(256, -1, dtype=np.int16)
    for digit in range(1, size + 1):
        table[ord(str(digit))] = digit
    if allow_blank:
        for char in BLANK_CHARACTERS:
            table[ord(char)] = 0
    return table


def _parse_column(texts: list[str], size: int, allow_blank: bool) -> tuple[np.ndarray, tuple[int, int] | None]:
    """Strings of ``size*size`` ASCII characters -> ``[N, size, size]`` digits and the first bad (row, position)."""
    raw = np.frombuffer("".join(texts).encode("ascii"), dtype=np.uint8).reshape(len(texts), size * size)
    digits = _digit_table(size, allow_blank)[raw]
    bad = np.argwhere(digits < 0)
    first_bad = (int(bad[0][0]), int(bad[0][1])) if len(bad) else None
    return digits.clip(0).astype(np.uint8).reshape(len(texts), size, size), first_bad


def read_sudoku_csv(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a Sudoku-Extreme style CSV (``source,question,answer,rating``) and validate every row.

    Returns ``(puzzles, solutions)``, two ``[N, size, size]`` uint8 arrays (0 = blank). Grids are 16,
    36 or 81 characters (4x4, 6x6, 9x9; one size per file); blanks are ``.`` or ``0``. Raises
    :class:`DatasetError` naming the file, the row and the problem for any malformed row. Checks are
    vectorised, so the 3.8M-row Sudoku-Extreme train file imports in seconds.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: CSV file not found (expected a header {','.join(CSV_HEADER)})")
    questions, answers, lines, size = _read_csv_rows(path)

    def where(row: int) -> str:
        return f"{path}, row {row + 1} (line {lines[row]})"

    puzzles, bad_question = _parse_column(questions, size, allow_blank=True)
    solutions, bad_answer = _parse_column(answers, size, allow_blank=False)
    for column, bad, accepted in (
        ("question", bad_question, f"digits 1-{size} and '.' or '0' for blanks"),
        ("answer", bad_answer, f"digits 1-{size}"),
    ):
        if bad is not None:
            text = (questions if column == "question" else answers)[bad[0]]
            raise DatasetError(f"{where(bad[0])}: {column} has {text[bad[1]]!r} at position {bad[1]}; accepted: {accepted}")
    _check_solutions(puzzles, solutions, where)
    return puzzles, solutions


def _read_csv_rows(path: Path) -> tuple[list[str], list[str], list[int], int]:
    """The questions, answers and line numbers of every row, and the grid size; a malformed row is named."""
    questions: list[str] = []
    answers: list[str] = []
    lines: list[int] = []
    size: int | None = None
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None or [name.strip() for name in header[:4]] != list(CSV_HEADER):
            raise DatasetError(f"{path}: header is {header}, expected {','.join(CSV_HEADER)}")
        for row in reader:
            if not row:
                continue
            where = f"{path}, row {len(questions) + 1} (line {reader.line_num})"
            question, answer, row_size = _checked_row(row, where)
            if size is None:
                size = row_size
            elif row_size != size:
                raise DatasetError(f"{where}: a {row_size}x{row_size} grid in a file of {size}x{size} grids")
            questions.append(question)
            answers.append(answer)
            lines.append(reader.line_num)
    if size is None:
        raise DatasetError(f"{path}: no puzzles after the header")
    return questions, answers, lines, size


def _checked_row(row: list[str], where: str) -> tuple[str, str, int]:
    """A row's question, answer and grid size, or a :class:`DatasetError` naming what is wrong."""
    if len(row) != len(CSV_HEADER):
        raise DatasetError(f"{where}: {len(row)} fields, expected {len(CSV_HEADER)} ({','.join(CSV_HEADER)})")
    question, answer = row[1].strip(), row[2].strip()
    row_size = _SIZE_OF_LENGTH.get(len(question))
    if row_size is None:
        accepted = ", ".join(f"{length} ({s}x{s})" for length, s in _SIZE_OF_LENGTH.items())
        raise DatasetError(f"{where}: question has {len(question)} characters; accepted lengths: {accepted}")
    if len(answer) != len(question):
        raise DatasetError(f"{where}: answer has {len(answer)} characters, question {len(question)}")
    for column, text in (("question", question), ("answer", answer)):
        if not text.isascii():
            position = next(i for i, char in enumerate(text) if not char.isascii())
            raise DatasetError(f"{where}: {column} has {text[position]!r} at position {position}")
    return question, answer, row_size


def _check_solutions(puzzles: np.ndarray, solutions: np.ndarray, where: Callable[[int], str]) -> None:
    """Every answer a valid solution that keeps its question's givens (vectorised, in chunks)."""
    for start in range(0, len(puzzles), _VALIDATION_CHUNK):
        chunk = slice(start, start + _VALIDATION_CHUNK)
        invalid = np.flatnonzero(~valid_solutions(solutions[chunk]))
        if len(invalid):
            raise DatasetError(f"{where(start + int(invalid[0]))}: answer is not a valid solution (a digit repeats in a row, column or box)")
        clashes = np.argwhere((puzzles[chunk] != 0) & (puzzles[chunk] != solutions[chunk]))
        if len(clashes):
            row, r, c = (int(x) for x in clashes[0])
            raise DatasetError(
                f"{where(start + row)}: question and answer disagree on a given at row {r}, column {c} "
                f"({puzzles[start + row, r, c]} vs {solutions[start + row, r, c]})"
            )


def build_sudoku_from_csv(
    output_dir: str | Path,
    input_csv: str | Path,
    test_csv: str | Path | None = None,
    subsample_size: int | None = None,
    num_aug: int = 0,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Import Sudoku-Extreme CSV files (train, optional test) and write them as a dataset."""
    if num_aug < 0:
        raise ValueError(f"num_aug must be >= 0, got {num_aug}")
    _check_output_dir(output_dir, overwrite)
    train = read_sudoku_csv(input_csv)
    test = read_sudoku_csv(test_csv) if test_csv is not None else None
    size = train[0].shape[1]
    if test is not None and test[0].shape[1] != size:
        raise DatasetError(f"{test_csv}: {test[0].shape[1]}x grids, but {input_csv} holds {size}x grids")
    rng = np.random.default_rng(seed)
    if subsample_size is not None:
        if not 1 <= subsample_size <= len(train[0]):
            raise DatasetError(f"--subsample-size {subsample_size}: {input_csv} has {len(train[0])} rows; accepted 1..{len(train[0])}")
        chosen = np.sort(rng.choice(len(train[0]), size=subsample_size, replace=False))
        train = (train[0][chosen], train[1][chosen])
    builder = csv_provenance(input_csv, test_csv, subsample_size, num_aug, seed)
    return _write_sudoku(output_dir, size, train, test, num_aug, rng, builder, overwrite)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser, generated = csv_or_generate_parser(
        __doc__.split("\n\n")[0],
        puzzle="puzzles with a unique solution",
        csv_name="Sudoku-Extreme",
        num_aug_help="extra augmented copies per train puzzle",
    )
    generated.add_argument("--size", type=int, choices=sorted(BOX_SHAPES), default=9)
    generated.add_argument("--num-train", type=int, default=1000)
    generated.add_argument("--num-test", type=int, default=100)
    generated.add_argument("--givens", type=int, help="exact number of clues (difficulty: fewer is harder)")
    generated.add_argument("--min-givens", type=int)
    generated.add_argument("--max-givens", type=int)
    return parse_csv_or_generate(parser, argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = _parse_args(argv)
    if args.generate:
        build = partial(
            build_generated_sudoku,
            args.output_dir,
            size=args.size,
            num_train=args.num_train,
            num_test=args.num_test,
            givens=args.givens,
            min_givens=args.min_givens,
            max_givens=args.max_givens,
            seed=args.seed,
            overwrite=args.overwrite,
            num_aug=args.num_aug,
        )
    else:
        build = partial(
            build_sudoku_from_csv,
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
