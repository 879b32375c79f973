"""The on-disk puzzle dataset format shared by every builder and by the loader.

A dataset is a folder::

    DATASET/
      metadata.json        DatasetMetadata below (format_version, sizes, vocabulary, splits)
      identifiers.json     JSON list: puzzle identifier i -> puzzle name ("<blank>" at index 0)
      test_puzzles.json    ARC only: the original, un-augmented puzzles the evaluator scores
      train/  inputs.npy labels.npy puzzle_identifiers.npy puzzle_indices.npy group_indices.npy
      test/   the same five arrays

Per split, with ``E`` examples, ``P`` puzzles and ``G`` groups:

* ``inputs``, ``labels``: ``[E, seq_len]`` integer tokens; ``labels == ignore_label_id`` takes no
  part in the loss (the loader turns it into ``IGNORE_LABEL_ID``).
* ``puzzle_identifiers``: ``[P]`` index into ``identifiers.json`` (the per-puzzle embedding row).
* ``puzzle_indices``: ``[P + 1]`` offsets: puzzle ``p`` owns examples ``puzzle_indices[p]:[p+1]``.
* ``group_indices``: ``[G + 1]`` offsets: group ``g`` owns puzzles ``group_indices[g]:[g+1]``.
  A group holds a puzzle and its augmentations; training samples one puzzle per group per epoch.

Folders written by the reference TRM code's builders (``SPLIT/dataset.json`` and
``SPLIT/<set>__<array>.npy``) are read in place by the same functions (:mod:`dataset.reference_format`).

Builders write into a temporary sibling folder and rename it into place, so an interrupted build
never leaves a partial dataset and an existing dataset is never overwritten unless asked.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
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
                raise DatasetError(
                    f"{file(name)}: tokens span [{array.min()}, {array.max()}], outside the vocabulary [0, {metadata.vocab_size})"
                )
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


def write_dataset(
    output_dir: str | Path,
    metadata: DatasetMetadata,
    splits: dict[str, SplitArrays],
    identifiers: list[str],
    extra_json: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Validate and write a dataset atomically; return its path.

    The dataset is written to a temporary folder beside ``output_dir`` and renamed into place, so
    a crash never leaves a half-written dataset. An existing ``output_dir`` is kept unless
    ``overwrite`` is set, in which case it is replaced only once the new one is complete.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise DatasetError(f"{output_dir} already exists; choose another --output-dir or pass --overwrite")
    if len(identifiers) != metadata.num_puzzle_identifiers:
        raise DatasetError(
            f"{len(identifiers)} identifiers for num_puzzle_identifiers={metadata.num_puzzle_identifiers}"
        )
    for name, arrays in splits.items():
        arrays.validate(metadata, f"{output_dir}/{name}")
        metadata.splits[name] = arrays.info()

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; a dataset is meant to be shared
    try:
        for name, arrays in splits.items():
            (staging / name).mkdir()
            for array_name in ARRAY_NAMES:
                np.save(staging / name / f"{array_name}.npy", getattr(arrays, array_name))
        _write_json(staging / "metadata.json", metadata.to_json())
        _write_json(staging / "identifiers.json", identifiers)
        for file_name, content in (extra_json or {}).items():
            _write_json(staging / file_name, content)
        if output_dir.exists():
            retired = output_dir.with_name(f".{output_dir.name}.old-{os.getpid()}")
            output_dir.rename(retired)
            staging.rename(output_dir)
            shutil.rmtree(retired)
        else:
            staging.rename(output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output_dir


def read_metadata(dataset_dir: str | Path) -> DatasetMetadata:
    """Read a dataset folder's metadata (``metadata.json``, or a reference folder's ``SPLIT/dataset.json``),
    with a clear error when it is missing or bad."""
    from dataset.reference_format import is_reference_dataset, read_reference_metadata

    path = Path(dataset_dir) / "metadata.json"
    if not Path(dataset_dir).is_dir():
        raise DatasetError(f"dataset folder {dataset_dir} does not exist; build it first (see README: Datasets)")
    if is_reference_dataset(dataset_dir):
        return read_reference_metadata(dataset_dir)
    if not path.is_file():
        raise DatasetError(
            f"{path} is missing: {dataset_dir} is neither a dataset folder built by dataset.build_* nor a reference TRM "
            "dataset (train/dataset.json, test/dataset.json)"
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatasetError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a JSON object")
    return DatasetMetadata.from_json(data, source=str(path))


def read_split_parts(
    dataset_dir: str | Path, split: str, metadata: DatasetMetadata | None = None, mmap: bool = False
) -> list[SplitArrays]:
    """One split's arrays as stored: one :class:`SplitArrays` for this toolkit's folders, one per set for
    a reference folder (each with its own offsets from 0, sharing one identifier space)."""
    from dataset.reference_format import is_reference_dataset, read_reference_split

    metadata = metadata or read_metadata(dataset_dir)
    if is_reference_dataset(dataset_dir):
        return read_reference_split(dataset_dir, split, metadata, mmap=mmap)
    return [read_split(dataset_dir, split, metadata, mmap=mmap)]


def concatenated_index(parts: list[SplitArrays]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(puzzle_identifiers, puzzle_indices, group_indices)`` of the parts one after the other (offsets
    shifted), the loader's order of a reference split's sets; the token arrays are not touched."""
    examples = np.cumsum([0] + [p.inputs.shape[0] for p in parts])
    puzzles = np.cumsum([0] + [len(p.puzzle_identifiers) for p in parts])
    return (
        np.concatenate([p.puzzle_identifiers.astype(np.int64) for p in parts]),
        np.concatenate([[0]] + [p.puzzle_indices[1:].astype(np.int64) + examples[i] for i, p in enumerate(parts)]),
        np.concatenate([[0]] + [p.group_indices[1:].astype(np.int64) + puzzles[i] for i, p in enumerate(parts)]),
    )


def concatenate_parts(parts: list[SplitArrays]) -> SplitArrays:
    """Several parts of one split as one :class:`SplitArrays` (offsets shifted; a single part is returned as is)."""
    if len(parts) == 1:
        return parts[0]
    identifiers, puzzle_indices, group_indices = concatenated_index(parts)
    return SplitArrays(
        inputs=np.concatenate([p.inputs for p in parts]),
        labels=np.concatenate([p.labels for p in parts]),
        puzzle_identifiers=identifiers,
        puzzle_indices=puzzle_indices,
        group_indices=group_indices,
    )


def read_split(
    dataset_dir: str | Path, split: str, metadata: DatasetMetadata | None = None, mmap: bool = False
) -> SplitArrays:
    """Load and validate one split's arrays (``mmap``: map ``inputs``/``labels`` read-only instead of reading them).

    A reference folder whose split holds several sets gets them concatenated (in memory);
    :class:`~dataset.puzzle_dataset.PuzzleDataset` reads the sets in place instead.
    """
    from dataset.reference_format import is_reference_dataset

    dataset_dir = Path(dataset_dir)
    metadata = metadata or read_metadata(dataset_dir)
    if is_reference_dataset(dataset_dir):
        return concatenate_parts(read_split_parts(dataset_dir, split, metadata, mmap=mmap))
    arrays: dict[str, np.ndarray] = {}
    for name in ARRAY_NAMES:
        path = dataset_dir / split / f"{name}.npy"
        if not path.is_file():
            raise DatasetError(f"{path} is missing (a split needs {list(ARRAY_NAMES)})")
        try:
            mmap_mode = "r" if mmap and name in ("inputs", "labels") else None
            arrays[name] = np.load(path, allow_pickle=False, mmap_mode=mmap_mode)
        except (ValueError, OSError, EOFError) as error:
            raise DatasetError(f"{path}: unreadable or truncated ({error})") from error
    split_arrays = SplitArrays(**arrays)
    split_arrays.validate(metadata, str(dataset_dir / split))
    return split_arrays


def read_identifiers(dataset_dir: str | Path) -> list[str]:
    """``identifiers.json``: puzzle identifier -> name (the same file in both formats)."""
    path = Path(dataset_dir) / "identifiers.json"
    if not path.is_file():
        raise DatasetError(f"{path} is missing")
    try:
        names = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatasetError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise DatasetError(f"{path}: expected a JSON list of puzzle names")
    return names


def _write_json(path: Path, content: Any) -> None:
    with open(path, "w") as handle:
        json.dump(content, handle)
