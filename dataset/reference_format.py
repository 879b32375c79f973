"""Dataset folders written by the reference TRM code's builders, read in place.

The reference builders (``dataset/build_{arc,sudoku,maze}_dataset.py`` of the TinyRecursiveModels
repository and of the JD study's fork) write::

    DATASET/
      identifiers.json            JSON list: puzzle identifier i -> puzzle name (as here)
      test_puzzles.json           ARC only (as here)
      train/  dataset.json        pad_id, ignore_label_id, blank_identifier_id, vocab_size, seq_len,
                                  num_puzzle_identifiers, total_groups, mean_puzzle_examples,
                                  total_puzzles, sets
              <set>__inputs.npy  <set>__labels.npy  <set>__puzzle_identifiers.npy
              <set>__puzzle_indices.npy  <set>__group_indices.npy     (one group of five per set)
      test/   the same

The arrays mean what they mean in this toolkit's format (:mod:`dataset.common`), per set: each set
has its own offsets starting at 0, and all sets of a folder share one identifier space. This module
turns such a folder into the toolkit's :class:`~dataset.common.DatasetMetadata` and one
:class:`~dataset.common.SplitArrays` per set, memory-mapped, validated as strictly as the toolkit's
own folders; nothing is converted or copied. :func:`dataset.common.read_metadata` and friends call it
when a folder has no ``metadata.json`` but has ``SPLIT/dataset.json``.

What the reference format does not record is inferred: ``kind`` (``arc`` when ``test_puzzles.json``
is present, ``sudoku`` for an 11-token vocabulary, ``maze`` for 6 tokens, ``unknown`` otherwise; the
token formats of this toolkit's builders agree with the reference's for all three) and ``grid_shape``
(a square grid when ``seq_len`` is a square, else one row).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from dataset.metadata import ARRAY_NAMES, SPLITS, DatasetError, DatasetMetadata, SplitArrays, SplitInfo

SPLIT_METADATA_FILE = "dataset.json"
REQUIRED_FIELDS = (
    "pad_id",
    "ignore_label_id",
    "blank_identifier_id",
    "vocab_size",
    "seq_len",
    "num_puzzle_identifiers",
    "total_groups",
    "mean_puzzle_examples",
    "total_puzzles",
    "sets",
)
SHARED_FIELDS = ("pad_id", "ignore_label_id", "blank_identifier_id", "vocab_size", "seq_len", "num_puzzle_identifiers")
"""Fields every split of one folder must agree on (the model is built from them)."""

KIND_BY_VOCAB = {11: "sudoku", 6: "maze"}


def is_reference_dataset(folder: str | Path) -> bool:
    """Whether ``folder`` is a reference-format dataset (no ``metadata.json``, some ``SPLIT/dataset.json``)."""
    folder = Path(folder)
    return not (folder / "metadata.json").exists() and any((folder / split / SPLIT_METADATA_FILE).is_file() for split in _split_names(folder))


def _split_names(folder: Path) -> list[str]:
    found = sorted(p.name for p in folder.iterdir() if (p / SPLIT_METADATA_FILE).is_file()) if folder.is_dir() else []
    return list(dict.fromkeys([*(s for s in SPLITS if s in found), *found]))


def read_split_metadata(folder: str | Path, split: str) -> dict[str, Any]:
    """``SPLIT/dataset.json`` of a reference folder, checked field by field."""
    path = Path(folder) / split / SPLIT_METADATA_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DatasetError(f"{path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatasetError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a JSON object with {list(REQUIRED_FIELDS)}")
    missing = [key for key in REQUIRED_FIELDS if key not in data]
    if missing:
        raise DatasetError(f"{path}: missing keys {missing}; a reference dataset.json has {list(REQUIRED_FIELDS)}")
    for key in SHARED_FIELDS + ("total_groups", "total_puzzles"):
        value = data[key]
        if key == "ignore_label_id" and value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise DatasetError(f"{path}: {key}={value!r} must be a non-negative integer")
    if data["seq_len"] < 1 or data["vocab_size"] < 1 or data["num_puzzle_identifiers"] < 1:
        raise DatasetError(f"{path}: seq_len, vocab_size and num_puzzle_identifiers must be positive")
    sets = data["sets"]
    if not isinstance(sets, list) or not sets or not all(isinstance(name, str) and name for name in sets):
        raise DatasetError(f"{path}: sets={sets!r} must be a non-empty list of set names")
    return data


def _infer_kind(folder: Path, vocab_size: int) -> str:
    if (folder / "test_puzzles.json").is_file():
        return "arc"
    return KIND_BY_VOCAB.get(vocab_size, "unknown")


def _grid_shape(seq_len: int) -> tuple[int, int]:
    side = math.isqrt(seq_len)
    return (side, side) if side * side == seq_len else (1, seq_len)


def _count(folder: Path, split: str, sets: list[str]) -> tuple[int, int]:
    """``(examples, puzzles)`` of a split, from the arrays (the reference's sudoku and maze builders
    write ``total_puzzles`` = the number of groups)."""
    examples = puzzles = 0
    for name in sets:
        examples += _load(folder / split / f"{name}__inputs.npy", mmap=True).shape[0]
        puzzles += _load(folder / split / f"{name}__puzzle_identifiers.npy", mmap=True).shape[0]
    return examples, puzzles


def read_reference_metadata(folder: str | Path) -> DatasetMetadata:
    """The toolkit's metadata of a reference-format folder (every split's ``dataset.json`` must agree)."""
    folder = Path(folder)
    per_split = {split: read_split_metadata(folder, split) for split in _split_names(folder)}
    if not per_split:
        raise DatasetError(f"{folder}: no SPLIT/{SPLIT_METADATA_FILE} found; not a reference TRM dataset folder")
    first_split, first = next(iter(per_split.items()))
    for split, data in per_split.items():
        for key in SHARED_FIELDS:
            if data[key] != first[key]:
                raise DatasetError(
                    f"{folder}/{split}/{SPLIT_METADATA_FILE}: {key}={data[key]!r} differs from {first_split}/{SPLIT_METADATA_FILE} "
                    f"({first[key]!r}); the splits of one dataset must agree on {list(SHARED_FIELDS)}"
                )
    splits = {}
    for split, data in per_split.items():
        examples, puzzles = _count(folder, split, data["sets"])
        splits[split] = SplitInfo(
            total_examples=examples,
            total_puzzles=puzzles,
            total_groups=int(data["total_groups"]),
            mean_puzzle_examples=examples / max(puzzles, 1),
        )
    return DatasetMetadata(
        kind=_infer_kind(folder, first["vocab_size"]),
        seq_len=first["seq_len"],
        vocab_size=first["vocab_size"],
        num_puzzle_identifiers=first["num_puzzle_identifiers"],
        grid_shape=_grid_shape(first["seq_len"]),
        pad_id=first["pad_id"],
        ignore_label_id=first["ignore_label_id"],
        blank_identifier_id=first["blank_identifier_id"],
        splits=splits,
        builder={"format": "reference", "sets": {split: list(data["sets"]) for split, data in per_split.items()}},
    )


def _load(path: Path, mmap: bool) -> np.ndarray:
    if not path.is_file():
        raise DatasetError(f"{path} is missing (each set of a reference split needs <set>__{{{', '.join(ARRAY_NAMES)}}}.npy)")
    try:
        return np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except (ValueError, OSError, EOFError) as error:
        raise DatasetError(f"{path}: unreadable or truncated ({error})") from None


def read_reference_split(folder: str | Path, split: str, metadata: DatasetMetadata, mmap: bool = True) -> list[SplitArrays]:
    """One validated :class:`SplitArrays` per set of ``split``, in ``dataset.json``'s order.

    ``mmap`` maps ``inputs`` and ``labels`` read-only (the index arrays are small and read).
    """
    folder = Path(folder)
    data = read_split_metadata(folder, split)
    parts = []
    for set_name in data["sets"]:
        arrays = {name: _load(folder / split / f"{set_name}__{name}.npy", mmap=mmap and name in ("inputs", "labels")) for name in ARRAY_NAMES}
        part = SplitArrays(**arrays)
        part.validate(metadata, str(folder / split), prefix=f"{set_name}__")
        parts.append(part)
    groups = sum(len(p.group_indices) - 1 for p in parts)
    if groups != int(data["total_groups"]):
        raise DatasetError(f"{folder / split / SPLIT_METADATA_FILE}: declares total_groups={data['total_groups']}, but its sets hold {groups} groups")
    return parts
