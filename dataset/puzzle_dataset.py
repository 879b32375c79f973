"""The puzzle loader: one or more dataset folders -> CPU batches for training and evaluation.

Train mode (:meth:`PuzzleDataset.train_batches`): an *iteration* covers ``epochs_per_iter`` epochs.
Each epoch visits the groups in a random order, samples one puzzle per group and shuffles the chosen
puzzles' examples; the epochs are concatenated and cut into full global batches, dropping the
incomplete tail. The plan depends only on ``(seed, iteration)``, so ``train_batches(it, start_batch=k)``
yields exactly the batches ``k, k+1, ...`` of the uninterrupted iterator (exact resume).

Test mode (:meth:`PuzzleDataset.test_batches`): every example once, in order, in global batches; the
last batch is padded (pad tokens, labels ``IGNORE_LABEL_ID``, blank identifier, ``example_index`` -1).

Every rank takes the contiguous slice ``[rank * local_batch_size, (rank + 1) * local_batch_size)`` of
each global batch. Several dataset folders are merged when they agree on their token format; the
puzzle identifiers of later datasets are shifted so each keeps its own embedding rows (identifier 0,
the blank, stays shared). Folders in the reference TRM code's format load the same way, in place; each
of their sets is one more source sharing the folder's identifiers (:mod:`dataset.reference_format`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from dataset.common import (
    DatasetError,
    DatasetMetadata,
    SplitArrays,
    SplitInfo,
    read_identifiers,
    read_metadata,
    read_split_parts,
)
from models.loss_terms import IGNORE_LABEL_ID

MERGE_FIELDS = ("kind", "seq_len", "vocab_size", "grid_shape", "pad_id", "ignore_label_id", "blank_identifier_id")
"""Metadata fields that must agree for datasets to be merged."""


@dataclass
class _Source:
    """One dataset folder's split, with its place in the merged index spaces."""

    path: Path
    arrays: SplitArrays
    example_offset: int  # first merged example index of this source
    ignore_label_id: int | None


def _merge_metadata(paths: list[Path], metadatas: list[DatasetMetadata]) -> None:
    """Raise :class:`DatasetError` naming the two paths and the field when datasets cannot be merged."""
    first_path, first = paths[0], metadatas[0]
    for path, metadata in zip(paths[1:], metadatas[1:]):
        for name in MERGE_FIELDS:
            if getattr(metadata, name) != getattr(first, name):
                raise DatasetError(
                    f"cannot merge {first_path} and {path}: {name} differs "
                    f"({getattr(first, name)!r} vs {getattr(metadata, name)!r}); datasets merged into one "
                    f"run must agree on {list(MERGE_FIELDS)}"
                )


def _identifier_map(num_identifiers: int, offset: int, blank_id: int) -> np.ndarray:
    """Map a dataset's identifiers into the merged table: the blank stays, the others shift by ``offset``."""
    mapping = np.arange(num_identifiers, dtype=np.int64) + offset
    mapping[blank_id] = blank_id
    return mapping


class PuzzleDataset:
    """Batches of one split of one or more merged puzzle datasets, for one rank.

    Args:
        paths: dataset folders written by a ``dataset.build_*`` builder or by the reference TRM code's builders.
        split: ``"train"`` or ``"test"`` (any split the folders hold).
        global_batch_size: examples per optimizer step summed over ranks.
        rank, world_size: this process's slice of every global batch.
        seed: train-mode shuffling seed (together with the iteration index).
        epochs_per_iter: epochs one train iteration covers.
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        split: str,
        global_batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        epochs_per_iter: int = 1,
    ) -> None:
        if isinstance(paths, (str, Path)):
            paths = [paths]
        if not paths:
            raise DatasetError("no dataset paths given; pass at least one folder built by dataset.build_*")
        if world_size < 1 or not 0 <= rank < world_size:
            raise DatasetError(f"rank={rank}, world_size={world_size}: need world_size >= 1 and 0 <= rank < world_size")
        if global_batch_size < 1 or global_batch_size % world_size:
            raise DatasetError(f"global_batch_size={global_batch_size} must be a positive multiple of world_size={world_size}")
        if epochs_per_iter < 1:
            raise DatasetError(f"epochs_per_iter={epochs_per_iter} must be >= 1")
        self.paths = [Path(path) for path in paths]
        self.split = split
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // world_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.epochs_per_iter = epochs_per_iter
        self._plan_cache: tuple[int, np.ndarray] | None = None
        self._cumulative_weights: np.ndarray | None = None  # hard-example sampling (set_puzzle_weights)

        metadatas = [read_metadata(path) for path in self.paths]
        _merge_metadata(self.paths, metadatas)
        for path, metadata in zip(self.paths, metadatas):
            if split not in metadata.splits:
                raise DatasetError(f"{path} has no {split!r} split (it holds {sorted(metadata.splits)}); rebuild it with that split")
        self._load(metadatas)
        if split == "train":
            self._check_trainable()

    # ------------------------------------------------------------------------------------------
    # Loading and merging
    # ------------------------------------------------------------------------------------------

    def _load(self, metadatas: list[DatasetMetadata]) -> None:
        blank_id = metadatas[0].blank_identifier_id
        self.identifiers: list[str] = []
        self._sources: list[_Source] = []
        puzzle_identifiers, puzzle_indices, group_indices = [], [np.zeros(1, dtype=np.int64)], [np.zeros(1, dtype=np.int64)]
        examples = puzzles = 0
        for path, metadata in zip(self.paths, metadatas):
            identifiers = read_identifiers(path)
            if len(identifiers) != metadata.num_puzzle_identifiers:
                raise DatasetError(f"{path}/identifiers.json: {len(identifiers)} names for num_puzzle_identifiers={metadata.num_puzzle_identifiers}")
            parts = read_split_parts(path, self.split, metadata, mmap=True)
            offset = 0 if not self.identifiers else len(self.identifiers) - 1
            if not self.identifiers:
                self.identifiers = list(identifiers)
            else:
                self.identifiers.extend(name for index, name in enumerate(identifiers) if index != blank_id)
            mapping = _identifier_map(len(identifiers), offset, blank_id)
            for arrays in parts:  # one per reference set; sets of a folder share its identifiers
                puzzle_identifiers.append(mapping[arrays.puzzle_identifiers.astype(np.int64)])
                puzzle_indices.append(arrays.puzzle_indices[1:].astype(np.int64) + examples)
                group_indices.append(arrays.group_indices[1:].astype(np.int64) + puzzles)
                self._sources.append(_Source(path, arrays, examples, metadata.ignore_label_id))
                examples += arrays.inputs.shape[0]
                puzzles += len(arrays.puzzle_identifiers)

        self._puzzle_identifiers = np.concatenate(puzzle_identifiers)
        self._puzzle_indices = np.concatenate(puzzle_indices)
        self._group_indices = np.concatenate(group_indices)
        self._source_offsets = np.array([source.example_offset for source in self._sources], dtype=np.int64)
        self.total_examples = examples

        merged_splits = {}
        for name in set.intersection(*(set(metadata.splits) for metadata in metadatas)):
            infos = [metadata.splits[name] for metadata in metadatas]
            total_examples = sum(info.total_examples for info in infos)
            total_puzzles = sum(info.total_puzzles for info in infos)
            merged_splits[name] = SplitInfo(
                total_examples=total_examples,
                total_puzzles=total_puzzles,
                total_groups=sum(info.total_groups for info in infos),
                mean_puzzle_examples=total_examples / max(total_puzzles, 1),
            )
        first = metadatas[0]
        self.metadata: DatasetMetadata = replace(
            first,
            num_puzzle_identifiers=len(self.identifiers),
            splits=merged_splits,
            builder=first.builder if len(metadatas) == 1 else {"merged": [m.builder for m in metadatas]},
        )

    def _check_trainable(self) -> None:
        """Fail unless every train iteration yields at least one full global batch."""
        puzzle_sizes = np.diff(self._puzzle_indices)
        smallest_per_group = np.minimum.reduceat(puzzle_sizes, self._group_indices[:-1]) if len(puzzle_sizes) else np.zeros(0)
        guaranteed = int(np.sum(smallest_per_group)) * self.epochs_per_iter
        if guaranteed < self.global_batch_size:
            raise DatasetError(
                f"{', '.join(map(str, self.paths))} split {self.split!r}: a train iteration of {self.epochs_per_iter} "
                f"epoch(s) samples as few as {guaranteed} examples (one puzzle per group), fewer than "
                f"global_batch_size={self.global_batch_size}; lower global_batch_size or raise epochs_per_iter"
            )

    # ------------------------------------------------------------------------------------------
    # Batch assembly
    # ------------------------------------------------------------------------------------------

    def _gather(self, example_indices: np.ndarray) -> dict[str, torch.Tensor]:
        """Build a batch from merged example indices; ``-1`` makes a padding row."""
        size = len(example_indices)
        seq_len = self.metadata.seq_len
        inputs = np.full((size, seq_len), self.metadata.pad_id, dtype=np.int64)
        labels = np.full((size, seq_len), IGNORE_LABEL_ID, dtype=np.int64)
        identifiers = np.full(size, self.metadata.blank_identifier_id, dtype=np.int64)
        real = example_indices >= 0
        if real.any():
            indices = example_indices[real]
            source_of = np.searchsorted(self._source_offsets, indices, side="right") - 1
            rows_inputs = np.empty((len(indices), seq_len), dtype=np.int64)
            rows_labels = np.empty((len(indices), seq_len), dtype=np.int64)
            for source_index in np.unique(source_of):
                source = self._sources[source_index]
                where = source_of == source_index
                local = indices[where] - source.example_offset
                rows_inputs[where] = source.arrays.inputs[local]
                source_labels = np.asarray(source.arrays.labels[local], dtype=np.int64)
                if source.ignore_label_id is not None:
                    source_labels = np.where(source_labels == source.ignore_label_id, IGNORE_LABEL_ID, source_labels)
                rows_labels[where] = source_labels
            inputs[real] = rows_inputs
            labels[real] = rows_labels
            puzzle_of = np.searchsorted(self._puzzle_indices, indices, side="right") - 1
            identifiers[real] = self._puzzle_identifiers[puzzle_of]
        return {
            "inputs": torch.from_numpy(inputs),
            "labels": torch.from_numpy(labels),
            "puzzle_identifiers": torch.from_numpy(identifiers),
            "example_index": torch.from_numpy(example_indices.astype(np.int64)),
        }

    def _local_slice(self, global_batch: np.ndarray) -> np.ndarray:
        start = self.rank * self.local_batch_size
        return global_batch[start : start + self.local_batch_size]

    # ------------------------------------------------------------------------------------------
    # Train mode
    # ------------------------------------------------------------------------------------------

    def set_puzzle_weights(self, identifier_weights: np.ndarray | None, by_puzzle_index: bool = False) -> None:
        """Pick each group's puzzle with probability proportional to the weight of its identifier from now
        on (``None``: uniformly again); the draws stay those of ``(seed, iteration)``. Hard-example sampling.
        ``by_puzzle_index`` reproduces the JD study's lookup: puzzle ``p`` gets the weight of identifier ``p``
        (1 past the table's end)."""
        self._plan_cache = None
        if identifier_weights is None:
            self._cumulative_weights = None
            return
        if len(identifier_weights) != len(self.identifiers):
            raise ValueError(f"{len(identifier_weights)} identifier weights for {len(self.identifiers)} identifiers")
        table = np.asarray(identifier_weights, dtype=np.float64)
        if by_puzzle_index:
            index = np.arange(len(self._puzzle_identifiers))
            weights = np.where(index < len(table), table[np.minimum(index, len(table) - 1)], 1.0).clip(0.0, None)
        else:
            weights = np.clip(table[self._puzzle_identifiers], 0.0, None)
        self._cumulative_weights = np.concatenate([[0.0], np.cumsum(weights)])

    def puzzle_weights(self) -> np.ndarray:
        """Each puzzle's current sampling weight (all 1 without hard-example sampling)."""
        if self._cumulative_weights is None:
            return np.ones(len(self._puzzle_identifiers))
        return np.diff(self._cumulative_weights)

    def _choose_puzzles(self, first_puzzle: np.ndarray, group_sizes: np.ndarray, draws: np.ndarray) -> np.ndarray:
        """One puzzle per group from uniform ``draws`` in [0, 1): uniformly, or by the puzzle weights."""
        uniform = first_puzzle + (draws * group_sizes).astype(np.int64)
        if self._cumulative_weights is None:
            return uniform
        cumulative = self._cumulative_weights
        start, stop = cumulative[first_puzzle], cumulative[first_puzzle + group_sizes]
        chosen = np.searchsorted(cumulative, start + draws * (stop - start), side="right") - 1
        chosen = np.clip(chosen, first_puzzle, first_puzzle + group_sizes - 1)
        return np.where(stop > start, chosen, uniform)

    def _epoch_examples(self, rng: np.random.Generator) -> np.ndarray:
        """One epoch: groups in random order, one random puzzle each, their examples shuffled."""
        groups = rng.permutation(len(self._group_indices) - 1)
        first_puzzle = self._group_indices[groups]
        group_sizes = self._group_indices[groups + 1] - first_puzzle
        puzzles = self._choose_puzzles(first_puzzle, group_sizes, rng.random(len(groups)))
        starts = self._puzzle_indices[puzzles]
        counts = self._puzzle_indices[puzzles + 1] - starts
        # Concatenate the ranges starts[i] : starts[i] + counts[i] without a Python loop.
        offsets = np.repeat(starts - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
        examples = offsets + np.arange(int(counts.sum()), dtype=np.int64)
        return rng.permutation(examples)

    def _train_plan(self, iteration: int) -> np.ndarray:
        """``[num_batches, global_batch_size]`` merged example indices of one train iteration."""
        if iteration < 0:
            raise ValueError(f"iteration must be >= 0, got {iteration}")
        if self._plan_cache is not None and self._plan_cache[0] == iteration:
            return self._plan_cache[1]
        self._check_trainable()
        rng = np.random.default_rng([self.seed, iteration])
        examples = np.concatenate([self._epoch_examples(rng) for _ in range(self.epochs_per_iter)])
        num_batches = len(examples) // self.global_batch_size
        plan = examples[: num_batches * self.global_batch_size].reshape(num_batches, self.global_batch_size)
        self._plan_cache = (iteration, plan)
        return plan

    def num_train_batches(self, iteration: int) -> int:
        """Number of global batches :meth:`train_batches` yields for ``iteration``."""
        return int(self._train_plan(iteration).shape[0])

    def train_batches(self, iteration: int, start_batch: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's slices of iteration ``iteration``'s global batches, from batch ``start_batch`` on."""
        plan = self._train_plan(iteration)
        if not 0 <= start_batch <= len(plan):
            raise ValueError(f"start_batch={start_batch} outside [0, {len(plan)}] for iteration {iteration}")
        for global_batch in plan[start_batch:]:
            yield self._gather(self._local_slice(global_batch))

    def estimated_total_batches(self, epochs: int) -> int:
        """``epochs * total_groups * mean_puzzle_examples / global_batch_size`` of the loaded split."""
        info = self.metadata.splits[self.split]
        return int(epochs * info.total_groups * info.mean_puzzle_examples / self.global_batch_size)

    # ------------------------------------------------------------------------------------------
    # Test mode
    # ------------------------------------------------------------------------------------------

    def num_test_batches(self) -> int:
        return -(-self.total_examples // self.global_batch_size)

    def test_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's slices of every example in order; the last global batch is padded with ``-1``."""
        for batch_index in range(self.num_test_batches()):
            start = batch_index * self.global_batch_size
            global_batch = np.arange(start, start + self.global_batch_size, dtype=np.int64)
            global_batch[global_batch >= self.total_examples] = -1
            yield self._gather(self._local_slice(global_batch))
