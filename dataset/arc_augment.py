"""ARC grid augmentations, their names, and the token encoding of a grid on the 30x30 canvas.

An augmentation is a dihedral transform (one of the 8 symmetries of the square) composed with a
permutation of the colours 1..9 (0, the background, stays fixed). The augmented copy of puzzle
``base`` is named ``f"{base}|||t{tid}|||{digits}"`` where ``digits`` are the images of the colours
0..9; the identity augmentation is the bare ``base``. The evaluator parses the name back to undo the
augmentation on the model's predictions.

Token encoding (``seq_len = 900``, vocabulary of 12)::

    0      pad (outside the grid; not scored)
    1      end-of-grid marker, written in the row just below and the column just right of the
           grid when they fall inside the canvas (so the model states the grid's size)
    2 + c  colour c in 0..9
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

GRID_SIZE = 30
SEQ_LEN = GRID_SIZE * GRID_SIZE
NUM_COLOURS = 10
PAD_TOKEN = 0
END_OF_GRID_TOKEN = 1
COLOUR_OFFSET = 2
VOCAB_SIZE = COLOUR_OFFSET + NUM_COLOURS
NAME_SEPARATOR = "|||"
NUM_DIHEDRAL = 8

DIHEDRAL_NAMES = (
    "identity",
    "rot90",
    "rot180",
    "rot270",
    "flip_left_right",
    "flip_up_down",
    "transpose",
    "anti_transpose",
)
# INVERSE_DIHEDRAL[t] undoes transform t: rotations by 90 and 270 undo each other, the rest are involutions.
INVERSE_DIHEDRAL = (0, 3, 2, 1, 4, 5, 6, 7)

_IDENTITY_COLOURS = tuple(range(NUM_COLOURS))


def dihedral_transform(grid: np.ndarray, tid: int) -> np.ndarray:
    """Apply dihedral transform ``tid`` (see ``DIHEDRAL_NAMES``) to a 2-D grid; rotations are counter-clockwise."""
    if tid == 0:
        return grid
    if tid == 1:
        return np.rot90(grid, 1)
    if tid == 2:
        return np.rot90(grid, 2)
    if tid == 3:
        return np.rot90(grid, 3)
    if tid == 4:
        return np.fliplr(grid)
    if tid == 5:
        return np.flipud(grid)
    if tid == 6:
        return grid.T
    if tid == 7:
        return np.rot90(grid, 2).T  # reflection about the anti-diagonal
    raise ValueError(f"dihedral transform id {tid!r} is not one of 0..{NUM_DIHEDRAL - 1}")


def inverse_dihedral_transform(grid: np.ndarray, tid: int) -> np.ndarray:
    """Undo :func:`dihedral_transform` with the same ``tid``."""
    if not 0 <= tid < NUM_DIHEDRAL:
        raise ValueError(f"dihedral transform id {tid!r} is not one of 0..{NUM_DIHEDRAL - 1}")
    return dihedral_transform(grid, INVERSE_DIHEDRAL[tid])


@dataclass(frozen=True)
class Augmentation:
    """A dihedral transform composed with a background-preserving colour permutation.

    ``colour_map[c]`` is the colour that colour ``c`` becomes; ``colour_map[0] == 0``.
    """

    dihedral: int = 0
    colour_map: tuple[int, ...] = _IDENTITY_COLOURS

    def __post_init__(self) -> None:
        if not (isinstance(self.dihedral, (int, np.integer)) and 0 <= self.dihedral < NUM_DIHEDRAL):
            raise ValueError(f"dihedral must be an integer in 0..{NUM_DIHEDRAL - 1}, got {self.dihedral!r}")
        colours = tuple(int(c) for c in self.colour_map)
        if sorted(colours) != list(_IDENTITY_COLOURS) or colours[0] != 0:
            raise ValueError(f"colour_map must be a permutation of 0..9 that keeps 0 fixed, got {self.colour_map!r}")
        object.__setattr__(self, "dihedral", int(self.dihedral))
        object.__setattr__(self, "colour_map", colours)

    @property
    def is_identity(self) -> bool:
        return self.dihedral == 0 and self.colour_map == _IDENTITY_COLOURS

    @classmethod
    def random(cls, rng: np.random.Generator) -> Augmentation:
        """Draw a dihedral transform and a permutation of colours 1..9 uniformly."""
        dihedral = int(rng.integers(NUM_DIHEDRAL))
        colours = (0, *(int(c) + 1 for c in rng.permutation(NUM_COLOURS - 1)))
        return cls(dihedral, colours)

    def apply(self, grid: np.ndarray) -> np.ndarray:
        """Recolour then transform ``grid`` (the two commute); returns a new contiguous array."""
        mapping = np.asarray(self.colour_map, dtype=np.uint8)
        return np.ascontiguousarray(dihedral_transform(mapping[grid], self.dihedral))

    def invert(self, grid: np.ndarray) -> np.ndarray:
        """Undo :meth:`apply`: ``aug.invert(aug.apply(g)) == g``."""
        inverse_mapping = np.argsort(np.asarray(self.colour_map)).astype(np.uint8)
        return np.ascontiguousarray(inverse_mapping[inverse_dihedral_transform(grid, self.dihedral)])

    def name(self, base: str) -> str:
        """The augmented puzzle's name; the identity keeps the bare ``base``."""
        if NAME_SEPARATOR in base:
            raise ValueError(f"puzzle name {base!r} must not contain {NAME_SEPARATOR!r}")
        if self.is_identity:
            return base
        digits = "".join(str(c) for c in self.colour_map)
        return f"{base}{NAME_SEPARATOR}t{self.dihedral}{NAME_SEPARATOR}{digits}"


def parse_name(name: str) -> tuple[str, Augmentation]:
    """Split an augmented puzzle name into its base name and its :class:`Augmentation` (inverse of ``name``)."""
    parts = name.split(NAME_SEPARATOR)
    if len(parts) == 1:
        return name, Augmentation()
    expected = f"'BASE{NAME_SEPARATOR}t<0-7>{NAME_SEPARATOR}<10 colour digits>'"
    if len(parts) != 3:
        raise ValueError(f"puzzle name {name!r} is neither a bare name nor {expected}")
    base, transform, digits = parts
    if not (len(transform) == 2 and transform[0] == "t" and transform[1].isdigit()):
        raise ValueError(f"puzzle name {name!r}: transform part {transform!r} is not t0..t7 (expected {expected})")
    if not (len(digits) == NUM_COLOURS and digits.isdigit()):
        raise ValueError(f"puzzle name {name!r}: colour part {digits!r} is not 10 digits (expected {expected})")
    return base, Augmentation(int(transform[1]), tuple(int(d) for d in digits))


def grid_to_tokens(grid: np.ndarray, offset: tuple[int, int] = (0, 0)) -> np.ndarray:
    """Encode a grid as ``SEQ_LEN`` uint8 tokens with its top-left cell at ``offset`` on the canvas."""
    grid = np.asarray(grid)
    if grid.ndim != 2 or grid.shape[0] < 1 or grid.shape[1] < 1:
        raise ValueError(f"a grid must be a non-empty 2-D array, got shape {grid.shape}")
    rows, cols = grid.shape
    top, left = offset
    if top < 0 or left < 0 or top + rows > GRID_SIZE or left + cols > GRID_SIZE:
        raise ValueError(f"a {rows}x{cols} grid at offset {offset} does not fit the {GRID_SIZE}x{GRID_SIZE} canvas")
    if grid.min() < 0 or grid.max() >= NUM_COLOURS:
        raise ValueError(f"grid colours span [{grid.min()}, {grid.max()}], outside 0..{NUM_COLOURS - 1}")
    canvas = np.full((GRID_SIZE, GRID_SIZE), PAD_TOKEN, dtype=np.uint8)
    canvas[top : top + rows, left : left + cols] = grid.astype(np.uint8) + COLOUR_OFFSET
    bottom, right = top + rows, left + cols
    if bottom < GRID_SIZE:
        canvas[bottom, left:right] = END_OF_GRID_TOKEN
    if right < GRID_SIZE:
        canvas[top:bottom, right] = END_OF_GRID_TOKEN
    return canvas.reshape(SEQ_LEN)


def tokens_to_grid(tokens: np.ndarray) -> np.ndarray | None:
    """Decode a grid placed at the canvas' top-left corner; ``None`` when the top-left cell is no colour.

    The grid is the largest-area rectangle anchored at (0, 0) whose cells are all colour tokens, so
    it ends at the first marker or pad token of each row and column (ties: the fewest rows).
    """
    canvas = np.asarray(tokens).reshape(GRID_SIZE, GRID_SIZE)
    is_colour = (canvas >= COLOUR_OFFSET) & (canvas < VOCAB_SIZE)
    # Length of the run of colour cells starting at column 0 of each row.
    row_runs = np.where(is_colour.all(axis=1), GRID_SIZE, np.argmin(is_colour, axis=1))
    widths = np.minimum.accumulate(row_runs)
    areas = widths * np.arange(1, GRID_SIZE + 1)
    best = int(np.argmax(areas))
    if areas[best] == 0:
        return None
    return (canvas[: best + 1, : widths[best]] - COLOUR_OFFSET).astype(np.uint8)


def random_offset(rng: np.random.Generator, shapes: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """A uniformly random top-left offset at which every grid of ``shapes`` fits the canvas."""
    rows = max(shape[0] for shape in shapes)
    cols = max(shape[1] for shape in shapes)
    return int(rng.integers(GRID_SIZE - rows + 1)), int(rng.integers(GRID_SIZE - cols + 1))
