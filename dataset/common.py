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
from pathlib import Path
from typing import Any

import numpy as np

from dataset.metadata import (
    ARRAY_NAMES as ARRAY_NAMES,
)
from dataset.metadata import (
    BLANK_IDENTIFIER as BLANK_IDENTIFIER,
)
from dataset.metadata import (
    FORMAT_VERSION as FORMAT_VERSION,
)
from dataset.metadata import (
    SPLITS as SPLITS,
)
from dataset.metadata import (
    DatasetError as DatasetError,
)
from dataset.metadata import (
    DatasetMetadata as DatasetMetadata,
)
from dataset.metadata import (
    SplitArrays as SplitArrays,
)
from dataset.metadata import (
    SplitInfo as SplitInfo,
)
from dataset.reference_format import is_reference_dataset, read_reference_metadata, read_reference_split


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
        raise DatasetError(f"{len(identifiers)} identifiers for num_puzzle_identifiers={metadata.num_puzzle_identifiers}")
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


def read_split_parts(dataset_dir: str | Path, split: str, metadata: DatasetMetadata | None = None, mmap: bool = False) -> list[SplitArrays]:
    """One split's arrays as stored: one :class:`SplitArrays` for this toolkit's folders, one per set for
    a reference folder (each with its own offsets from 0, sharing one identifier space)."""
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


def read_split(dataset_dir: str | Path, split: str, metadata: DatasetMetadata | None = None, mmap: bool = False) -> SplitArrays:
    """Load and validate one split's arrays (``mmap``: map ``inputs``/``labels`` read-only instead of reading them).

    A reference folder whose split holds several sets gets them concatenated (in memory);
    :class:`~dataset.puzzle_dataset.PuzzleDataset` reads the sets in place instead.
    """
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
            arrays[name] = np.load(path, allow_pickle=False, mmap_mode="r" if mmap and name in ("inputs", "labels") else None)
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
