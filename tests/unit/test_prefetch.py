"""Reading batches ahead (training/prefetch.py): the same batches in the same order, the same run, exact resume.

This file holds the unit tests; the others are in tests/integration/test_prefetch.py.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from dataset.puzzle_dataset import PuzzleDataset
from training.prefetch import TrainBatches
from training.state import Progress

CPU = torch.device("cpu")


def _stream(data: PuzzleDataset, depth: int, iterations: int, progress: Progress, ends: list[tuple[int, int]]) -> TrainBatches:
    return TrainBatches(progress, iterations, data.train_batches, lambda: ends.append((progress.iteration, progress.batch_in_iteration)), depth, CPU)


def _drain(stream: TrainBatches, progress: Progress) -> list[tuple[int, int, torch.Tensor]]:
    seen = []
    while (batch := stream.next()) is not None:
        seen.append((progress.iteration, progress.batch_in_iteration, batch["example_index"].clone()))
    return seen


@pytest.mark.parametrize("depth", [1, 3])
def test_read_ahead_gives_the_same_batches_positions_and_iteration_ends(sudoku_data: Path, depth: int) -> None:
    data = PuzzleDataset([sudoku_data], "train", global_batch_size=16, seed=3, epochs_per_iter=1)
    plain_progress, ahead_progress = Progress(), Progress()
    plain_ends: list[tuple[int, int]] = []
    ahead_ends: list[tuple[int, int]] = []
    plain = _drain(_stream(data, 0, 3, plain_progress, plain_ends), plain_progress)
    ahead_stream = _stream(data, depth, 3, ahead_progress, ahead_ends)
    ahead = _drain(ahead_stream, ahead_progress)
    assert len(plain) == len(ahead) == 3 * data.num_train_batches(0)
    for (i, b, x), (j, c, y) in zip(plain, ahead):
        assert (i, b) == (j, c) and torch.equal(x, y)
    assert plain_ends == ahead_ends == [(1, 0), (2, 0), (3, 0)]  # each end after the iteration's last batch
    assert ahead_stream.take_wait() >= 0.0 and ahead_stream.take_wait() == 0.0


def test_read_ahead_starts_mid_iteration_and_stops_cleanly(sudoku_data: Path) -> None:
    data = PuzzleDataset([sudoku_data], "train", global_batch_size=16, seed=3, epochs_per_iter=1)
    progress = Progress(iteration=1, batch_in_iteration=2)
    stream = _stream(data, 2, 2, progress, [])
    first = stream.next()
    expected = list(data.train_batches(1, start_batch=2))[0]
    assert torch.equal(first["example_index"], expected["example_index"]) and progress.batch_in_iteration == 3
    stream.close()  # the thread stops though batches remain
    assert not [t for t in threading.enumerate() if t.name == "batch-read-ahead"]


def test_an_error_while_reading_ahead_reaches_the_trainer() -> None:
    def broken(iteration: int, start: int) -> Iterator[dict[str, torch.Tensor]]:
        yield {"x": torch.zeros(1)}
        raise OSError("disk gone")

    stream = TrainBatches(Progress(), 1, broken, lambda: None, 2, CPU)
    assert stream.next() is not None
    with pytest.raises(OSError, match="disk gone"):
        stream.next()
    with pytest.raises(ValueError, match=">= 0"):
        TrainBatches(Progress(), 1, broken, lambda: None, -1, CPU)
