"""The in-memory types of the puzzle dataset format (:mod:`dataset.common` documents the format)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

FORMAT_VERSION = 1
SPLITS = ("train", "test")
ARRAY_NAMES = ("inputs", "labels", "puzzle_identifiers", "puzzle_indices", "group_indices")
BLANK_IDENTIFIER = "<blank>"


class DatasetError(ValueError):
    """A dataset folder or a builder's input is missing, malformed or inconsistent."""


@dataclass
class SplitInfo:
    total_examples: int
    total_puzzles: int
    total_groups: int
    mean_puzzle_examples: float


@dataclass
class DatasetMetadata:
    """What the loader and the model need to know about a dataset (``metadata.json``)."""

    kind: str  # "arc", "sudoku", "maze" or another builder's name
    seq_len: int
    vocab_size: int
    num_puzzle_identifiers: int
    grid_shape: tuple[int, int]  # (rows, cols) of the canvas flattened into seq_len
    pad_id: int = 0
    ignore_label_id: int | None = 0  # None: every label is scored (the reference format allows it)
    blank_identifier_id: int = 0
    splits: dict[str, SplitInfo] = field(default_factory=dict)
    builder: dict[str, Any] = field(default_factory=dict)  # the builder's arguments, for provenance
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["grid_shape"] = list(self.grid_shape)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str = "metadata.json") -> DatasetMetadata:
        required = ("kind", "seq_len", "vocab_size", "num_puzzle_identifiers", "grid_shape")
        missing = [key for key in required if key not in data]
        if missing:
            raise DatasetError(f"{source}: missing keys {missing}; a dataset needs {list(required)}")
        version = data.get("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise DatasetError(f"{source}: format_version {version} is not supported (expected {FORMAT_VERSION})")
        grid = data["grid_shape"]
        if not (isinstance(grid, list) and len(grid) == 2 and all(isinstance(v, int) and v > 0 for v in grid)):
            raise DatasetError(f"{source}: grid_shape {grid!r} must be [rows, cols] of positive integers")
        if grid[0] * grid[1] != data["seq_len"]:
            raise DatasetError(f"{source}: grid_shape {grid} holds {grid[0] * grid[1]} cells but seq_len is {data['seq_len']}; they must agree")
        ignore = data.get("ignore_label_id", 0)
        splits = {name: SplitInfo(**info) for name, info in data.get("splits", {}).items()}
        return cls(
            kind=str(data["kind"]),
            seq_len=int(data["seq_len"]),
            vocab_size=int(data["vocab_size"]),
            num_puzzle_identifiers=int(data["num_puzzle_identifiers"]),
            grid_shape=(int(data["grid_shape"][0]), int(data["grid_shape"][1])),
            pad_id=int(data.get("pad_id", 0)),
            ignore_label_id=None if ignore is None else int(ignore),
            blank_identifier_id=int(data.get("blank_identifier_id", 0)),
            splits=splits,
            builder=dict(data.get("builder", {})),
            format_version=version,
        )


@dataclass
class SplitArrays:
    """The five arrays of one split, in memory."""

    inputs: np.ndarray
    labels: np.ndarray
    puzzle_identifiers: np.ndarray
    puzzle_indices: np.ndarray
    group_indices: np.ndarray

    def info(self) -> SplitInfo:
        puzzles = len(self.puzzle_identifiers)
        return SplitInfo(
            total_examples=int(self.inputs.shape[0]),
            total_puzzles=puzzles,
            total_groups=len(self.group_indices) - 1,
            mean_puzzle_examples=float(self.inputs.shape[0] / max(puzzles, 1)),
        )

    def validate(self, metadata: DatasetMetadata, where: str, prefix: str = "") -> None:
        """Raise :class:`DatasetError` naming the file (``where/PREFIXname.npy``) and the problem if the split is inconsistent."""
        file = lambda name: f"{where}/{prefix}{name}.npy"  # noqa: E731
        for name in ARRAY_NAMES:
            array = getattr(self, name)
            if not np.issubdtype(array.dtype, np.integer):
                raise DatasetError(f"{file(name)}: dtype {array.dtype}, expected integers (tokens and indices are never cast)")
            if name not in ("inputs", "labels") and array.ndim != 1:
                raise DatasetError(f"{file(name)}: shape {array.shape}, expected a 1-D array")
        examples = self.inputs.shape[0]
        if self.inputs.ndim != 2 or self.inputs.shape[1] != metadata.seq_len:
            raise DatasetError(f"{file('inputs')}: shape {self.inputs.shape}, expected [E, {metadata.seq_len}]")
        if self.labels.shape != self.inputs.shape:
            raise DatasetError(f"{file('labels')}: shape {self.labels.shape} differs from inputs {self.inputs.shape}")
        for name in ("inputs", "labels"):
            array = getattr(self, name)
            if examples and (array.min() < 0 or array.max() >= metadata.vocab_size):
                raise DatasetError(f"{file(name)}: tokens span [{array.min()}, {array.max()}], outside the vocabulary [0, {metadata.vocab_size})")
        pi, gi = self.puzzle_indices, self.group_indices
        if len(pi) != len(self.puzzle_identifiers) + 1 or pi[0] != 0 or pi[-1] != examples or np.any(np.diff(pi) < 0):
            raise DatasetError(f"{file('puzzle_indices')}: must be non-decreasing offsets from 0 to {examples}")
        if len(gi) < 1 or gi[0] != 0 or gi[-1] != len(self.puzzle_identifiers) or np.any(np.diff(gi) <= 0):
            raise DatasetError(f"{file('group_indices')}: must be increasing offsets from 0 to {len(self.puzzle_identifiers)}")
        ids = self.puzzle_identifiers
        if len(ids) and (ids.min() < 0 or ids.max() >= metadata.num_puzzle_identifiers):
            raise DatasetError(
                f"{file('puzzle_identifiers')}: identifiers span [{ids.min()}, {ids.max()}], outside [0, {metadata.num_puzzle_identifiers})"
            )
