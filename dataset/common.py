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
    ignore_label_id: int = 0
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
        splits = {name: SplitInfo(**info) for name, info in data.get("splits", {}).items()}
        return cls(
            kind=str(data["kind"]),
            seq_len=int(data["seq_len"]),
            vocab_size=int(data["vocab_size"]),
            num_puzzle_identifiers=int(data["num_puzzle_identifiers"]),
            grid_shape=(int(data["grid_shape"][0]), int(data["grid_shape"][1])),
            pad_id=int(data.get("pad_id", 0)),
            ignore_label_id=int(data.get("ignore_label_id", 0)),
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

    def validate(self, metadata: DatasetMetadata, where: str) -> None:
        """Raise :class:`DatasetError` naming the array and the problem if the split is inconsistent."""
        examples = self.inputs.shape[0]
        if self.inputs.ndim != 2 or self.inputs.shape[1] != metadata.seq_len:
            raise DatasetError(f"{where}/inputs.npy: shape {self.inputs.shape}, expected [E, {metadata.seq_len}]")
        if self.labels.shape != self.inputs.shape:
            raise DatasetError(f"{where}/labels.npy: shape {self.labels.shape} differs from inputs {self.inputs.shape}")
        for name in ("inputs", "labels"):
            array = getattr(self, name)
            if examples and (array.min() < 0 or array.max() >= metadata.vocab_size):
                raise DatasetError(
                    f"{where}/{name}.npy: tokens span [{array.min()}, {array.max()}], "
                    f"outside the vocabulary [0, {metadata.vocab_size})"
                )
        pi, gi = self.puzzle_indices, self.group_indices
        if len(pi) != len(self.puzzle_identifiers) + 1 or pi[0] != 0 or pi[-1] != examples or np.any(np.diff(pi) < 0):
            raise DatasetError(f"{where}/puzzle_indices.npy: must be non-decreasing offsets from 0 to {examples}")
        if len(gi) < 1 or gi[0] != 0 or gi[-1] != len(self.puzzle_identifiers) or np.any(np.diff(gi) <= 0):
            raise DatasetError(
                f"{where}/group_indices.npy: must be increasing offsets from 0 to {len(self.puzzle_identifiers)}"
            )
        ids = self.puzzle_identifiers
        if len(ids) and (ids.min() < 0 or ids.max() >= metadata.num_puzzle_identifiers):
            raise DatasetError(
                f"{where}/puzzle_identifiers.npy: identifiers span [{ids.min()}, {ids.max()}], "
                f"outside [0, {metadata.num_puzzle_identifiers})"
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
    """Read ``metadata.json`` of a dataset folder, with a clear error when it is missing or bad."""
    path = Path(dataset_dir) / "metadata.json"
    if not Path(dataset_dir).is_dir():
        raise DatasetError(f"dataset folder {dataset_dir} does not exist; build it first (see README: Datasets)")
    if not path.is_file():
        raise DatasetError(f"{path} is missing: {dataset_dir} is not a dataset folder built by dataset.build_*")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise DatasetError(f"{path}: not valid JSON ({error})") from error
    return DatasetMetadata.from_json(data, source=str(path))


def read_split(
    dataset_dir: str | Path, split: str, metadata: DatasetMetadata | None = None, mmap: bool = False
) -> SplitArrays:
    """Load and validate one split's arrays (``mmap``: map ``inputs``/``labels`` read-only instead of reading them)."""
    dataset_dir = Path(dataset_dir)
    metadata = metadata or read_metadata(dataset_dir)
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
    path = Path(dataset_dir) / "identifiers.json"
    if not path.is_file():
        raise DatasetError(f"{path} is missing")
    return list(json.loads(path.read_text()))


def _write_json(path: Path, content: Any) -> None:
    with open(path, "w") as handle:
        json.dump(content, handle)
