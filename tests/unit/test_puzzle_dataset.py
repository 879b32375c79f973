"""PuzzleDataset: test coverage across ranks, train sampling and packing, exact resume, merging, errors."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from dataset.build_sudoku_dataset import build_generated_sudoku
from dataset.common import DatasetError, DatasetMetadata, SplitArrays, read_split, write_dataset
from dataset.puzzle_dataset import PuzzleDataset
from models.loss_terms import IGNORE_LABEL_ID

SEQ_LEN = 3


def _synthetic_split(groups: int, puzzles_per_group: int, examples_per_puzzle: int, identifier_count: int) -> SplitArrays:
    """Example ``e``'s inputs are ``[e % 50 + 1, puzzle % 50 + 1, group % 50 + 1]``; every label row ends in 0."""
    puzzles = groups * puzzles_per_group
    examples = puzzles * examples_per_puzzle
    example_ids = np.arange(examples)
    puzzle_of = example_ids // examples_per_puzzle
    group_of = puzzle_of // puzzles_per_group
    inputs = np.stack([example_ids % 50 + 1, puzzle_of % 50 + 1, group_of % 50 + 1], axis=1).astype(np.uint8)
    labels = inputs.copy()
    labels[:, -1] = 0  # the ignore label
    return SplitArrays(
        inputs=inputs,
        labels=labels,
        puzzle_identifiers=(np.arange(puzzles) % identifier_count).astype(np.int32),
        puzzle_indices=np.arange(0, examples + 1, examples_per_puzzle, dtype=np.int32),
        group_indices=np.arange(0, puzzles + 1, puzzles_per_group, dtype=np.int32),
    )


def _synthetic_dataset(
    path: Path,
    groups: int = 6,
    puzzles_per_group: int = 3,
    examples_per_puzzle: int = 2,
    identifiers: tuple[str, ...] = ("<blank>", "a", "b"),
    seq_len: int = SEQ_LEN,
    test_groups: int = 5,
) -> Path:
    metadata = DatasetMetadata(kind="synthetic", seq_len=seq_len, vocab_size=60, num_puzzle_identifiers=len(identifiers), grid_shape=(1, seq_len))
    splits = {
        "train": _synthetic_split(groups, puzzles_per_group, examples_per_puzzle, len(identifiers)),
        "test": _synthetic_split(test_groups, 1, 1, len(identifiers)),
    }
    if seq_len != SEQ_LEN:
        for arrays in splits.values():
            arrays.inputs = np.repeat(arrays.inputs[:, :1], seq_len, axis=1)
            arrays.labels = arrays.inputs.copy()
    return write_dataset(path, metadata, splits, list(identifiers))


def _global_batches(path: Path, world_size: int, global_batch_size: int, seed: int = 0, iteration: int = 0) -> list[dict[str, torch.Tensor]]:
    """Train batches of every rank, concatenated back into global batches."""
    per_rank = [
        list(PuzzleDataset([path], "train", global_batch_size, rank=rank, world_size=world_size, seed=seed).train_batches(iteration))
        for rank in range(world_size)
    ]
    assert len({len(batches) for batches in per_rank}) == 1
    return [{key: torch.cat([batches[i][key] for batches in per_rank]) for key in per_rank[0][i]} for i in range(len(per_rank[0]))]


def test_test_batches_cover_every_example_once_across_two_ranks(tmp_path: Path) -> None:
    path = build_generated_sudoku(tmp_path / "s", size=4, num_train=20, num_test=13, seed=0, progress=False)
    stored = read_split(path, "test")
    seen: list[int] = []
    batch_counts = []
    for rank in range(2):
        dataset = PuzzleDataset([path], "test", 6, rank=rank, world_size=2)
        assert dataset.local_batch_size == 3
        batches = list(dataset.test_batches())
        batch_counts.append(len(batches))
        for batch in batches:
            assert batch["inputs"].shape == (3, 16) and batch["inputs"].dtype == torch.int64
            for key in ("labels", "puzzle_identifiers", "example_index"):
                assert batch[key].dtype == torch.int64 and batch[key].shape[0] == 3
            real = batch["example_index"] >= 0
            indices = batch["example_index"][real].numpy()
            np.testing.assert_array_equal(batch["inputs"][real].numpy(), stored.inputs[indices])
            np.testing.assert_array_equal(batch["labels"][real].numpy(), stored.labels[indices])
            assert torch.all(batch["inputs"][~real] == 0) and torch.all(batch["labels"][~real] == IGNORE_LABEL_ID)
            assert torch.all(batch["puzzle_identifiers"] == 0)
            seen.extend(indices.tolist())
    assert batch_counts == [3, 3]  # ceil(13 / 6) on both ranks, so collectives stay in step
    assert sorted(seen) == list(range(13))


def test_test_batches_keep_order(tmp_path: Path) -> None:
    path = _synthetic_dataset(tmp_path / "d")
    batches = list(PuzzleDataset([path], "test", 2).test_batches())
    order = torch.cat([batch["example_index"] for batch in batches]).tolist()
    assert order == [0, 1, 2, 3, 4, -1]


def test_train_batches_are_full_and_sample_one_puzzle_per_group(tmp_path: Path) -> None:
    path = _synthetic_dataset(tmp_path / "d")  # 6 groups x 3 puzzles x 2 examples: 12 examples per epoch
    batches = _global_batches(path, world_size=2, global_batch_size=4)
    assert len(batches) == 3
    examples = torch.cat([batch["example_index"] for batch in batches]).numpy()
    assert len(set(examples.tolist())) == 12
    puzzles = examples // 2
    assert Counter((puzzles // 3).tolist()) == {group: 2 for group in range(6)}  # each group once ...
    assert all(len(set(puzzles[puzzles // 3 == group])) == 1 for group in range(6))  # ... with one puzzle
    for batch in batches:
        assert batch["inputs"].shape == (4, SEQ_LEN)
        np.testing.assert_array_equal(batch["inputs"][:, 0].numpy(), batch["example_index"].numpy() % 50 + 1)
        # labels: the stored ignore label 0 becomes IGNORE_LABEL_ID, the rest is kept
        assert torch.all(batch["labels"][:, -1] == IGNORE_LABEL_ID)
        assert torch.equal(batch["labels"][:, :-1], batch["inputs"][:, :-1])
        np.testing.assert_array_equal(batch["puzzle_identifiers"].numpy(), (batch["example_index"].numpy() // 2) % 3)


def test_train_iteration_spans_epochs_and_drops_only_the_tail(tmp_path: Path) -> None:
    path = _synthetic_dataset(tmp_path / "d", groups=5, puzzles_per_group=2, examples_per_puzzle=1)
    dataset = PuzzleDataset([path], "train", 4, epochs_per_iter=3)
    assert dataset.num_train_batches(0) == 3  # 15 sampled examples -> 3 full batches, 3 dropped
    examples = torch.cat([batch["example_index"] for batch in dataset.train_batches(0)]).numpy()
    groups = Counter((examples // 2).tolist())
    assert sum(groups.values()) == 12 and max(groups.values()) <= 3


def test_train_batches_are_deterministic_and_resume_exactly(tmp_path: Path) -> None:
    path = _synthetic_dataset(tmp_path / "d", groups=20)
    first = PuzzleDataset([path], "train", 4, rank=1, world_size=2, seed=5)
    again = PuzzleDataset([path], "train", 4, rank=1, world_size=2, seed=5)
    full = list(first.train_batches(3))
    assert len(full) == first.num_train_batches(3) == 10
    for a, b in zip(full, again.train_batches(3)):
        assert all(torch.equal(a[key], b[key]) for key in a)
    for start in (0, 4, 9, 10):
        resumed = list(again.train_batches(3, start_batch=start))
        assert len(resumed) == len(full) - start
        for a, b in zip(full[start:], resumed):
            assert all(torch.equal(a[key], b[key]) for key in a)
    order = lambda batches: torch.cat([b["example_index"] for b in batches]).tolist()  # noqa: E731
    assert order(full) != order(first.train_batches(4))  # another iteration, another order
    assert order(full) != order(PuzzleDataset([path], "train", 4, rank=1, world_size=2, seed=6).train_batches(3))
    with pytest.raises(ValueError, match="start_batch=11"):
        list(first.train_batches(3, start_batch=11))


def test_rank_slices_tile_the_global_batch(tmp_path: Path) -> None:
    path = _synthetic_dataset(tmp_path / "d", groups=8)
    single = list(PuzzleDataset([path], "train", 4, seed=2).train_batches(0))
    split = _global_batches(path, world_size=2, global_batch_size=4, seed=2)
    assert len(single) == len(split) == 4
    for a, b in zip(single, split):
        assert all(torch.equal(a[key], b[key]) for key in a)


def test_estimated_total_batches_follows_the_reference_formula(tmp_path: Path) -> None:
    path = _synthetic_dataset(tmp_path / "d", groups=10)  # 10 groups, 2 examples per puzzle
    assert PuzzleDataset([path], "train", 4).estimated_total_batches(epochs=6) == 6 * 10 * 2 // 4


def test_merging_offsets_identifiers_and_examples(tmp_path: Path) -> None:
    first = _synthetic_dataset(tmp_path / "one", identifiers=("<blank>", "a", "b"), test_groups=3)
    second = _synthetic_dataset(tmp_path / "two", identifiers=("<blank>", "c"), test_groups=4)
    merged = PuzzleDataset([first, second], "test", 8)
    assert merged.identifiers == ["<blank>", "a", "b", "c"]
    assert merged.metadata.num_puzzle_identifiers == 4
    assert merged.metadata.splits["test"].total_examples == 7
    (batch,) = list(merged.test_batches())
    assert batch["example_index"].tolist() == [0, 1, 2, 3, 4, 5, 6, -1]
    # first dataset: identifiers p % 3 unchanged; second: p % 2, with 1 ("c") shifted to 3 and 0 kept blank
    assert batch["puzzle_identifiers"].tolist() == [0, 1, 2, 0, 3, 0, 3, 0]
    assert batch["inputs"][3:7, 0].tolist() == [1, 2, 3, 4]  # the second dataset's own examples
    train = PuzzleDataset([first, second], "train", 4)
    assert train.metadata.splits["train"].total_groups == 12
    examples = torch.cat([b["example_index"] for b in train.train_batches(0)])
    assert len(examples) == 24 and len(set(examples.tolist())) == 24


def test_merging_rejects_incompatible_datasets(tmp_path: Path) -> None:
    first = _synthetic_dataset(tmp_path / "one")
    other = _synthetic_dataset(tmp_path / "long", seq_len=5)
    with pytest.raises(DatasetError, match="seq_len differs") as error:
        PuzzleDataset([first, other], "test", 4)
    assert str(first) in str(error.value) and str(other) in str(error.value)


def test_bad_paths_and_splits(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        PuzzleDataset([tmp_path / "nowhere"], "train", 4)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="metadata.json is missing"):
        PuzzleDataset([tmp_path / "empty"], "train", 4)
    path = _synthetic_dataset(tmp_path / "d")
    with pytest.raises(DatasetError, match="no 'valid' split"):
        PuzzleDataset([path], "valid", 4)


def test_truncated_arrays_are_reported(tmp_path: Path) -> None:
    path = _synthetic_dataset(tmp_path / "d")
    target = path / "train" / "inputs.npy"
    target.write_bytes(target.read_bytes()[:-7])
    with pytest.raises(DatasetError, match="inputs.npy"):
        PuzzleDataset([path], "train", 4)


def test_bad_batch_sizes(tmp_path: Path) -> None:
    path = _synthetic_dataset(tmp_path / "d")
    with pytest.raises(DatasetError, match="global_batch_size=6 must be a positive multiple of world_size=4"):
        PuzzleDataset([path], "train", 6, world_size=4)
    with pytest.raises(DatasetError, match="rank=2"):
        PuzzleDataset([path], "train", 4, rank=2, world_size=2)
    with pytest.raises(DatasetError, match="as few as 12 examples.*global_batch_size=16"):
        PuzzleDataset([path], "train", 16)
    assert PuzzleDataset([path], "train", 16, epochs_per_iter=2).num_train_batches(0) == 1
    assert len(list(PuzzleDataset([path], "test", 16).test_batches())) == 1  # test mode pads instead
