"""Reading batches ahead (training/prefetch.py): the same batches in the same order, the same run, exact resume."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from dataset.puzzle_dataset import PuzzleDataset
from pretrain import run
from tests.conftest import compose, tiny_overrides
from tests.test_reliability import assert_same_training_state, kill_after_checkpoint, read_records
from training.checkpoint import list_checkpoints
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


def test_a_run_reading_ahead_is_the_run_without(sudoku_data: Path, tmp_path: Path) -> None:
    common = dict(max_steps=14, eval_interval=1, custom_sampling=True, **{"jd.split": "iwrm_with_q_halt_in"})
    plain = Path(run(compose(tiny_overrides(sudoku_data, tmp_path, run_name="plain", prefetch_batches=0, **common)))["run_dir"])
    ahead = Path(run(compose(tiny_overrides(sudoku_data, tmp_path, run_name="ahead", prefetch_batches=2, **common)))["run_dir"])
    assert read_records(plain) == read_records(ahead)
    assert_same_training_state(plain, ahead)
    waits = [r for r in (line for line in (ahead / "metrics.jsonl").read_text().splitlines()) if "train/data_wait_s" in r]
    assert len(waits) == 14


@pytest.mark.slow
def test_sigkill_mid_epoch_while_reading_ahead_then_resume_matches(sudoku_data: Path, tmp_path: Path) -> None:
    kill_after = random.Random().choice([k for k in range(2, 16) if k % 6])  # 6 batches per epoch: mid-epoch
    common = dict(max_steps=24, epochs=8, eval_interval=2, checkpoint_interval=1, keep_last=3, prefetch_batches=3, custom_sampling=True)
    reference = Path(run(compose(tiny_overrides(sudoku_data, tmp_path, run_name="reference", **common)))["run_dir"])
    args = tiny_overrides(sudoku_data, tmp_path, run_name="killed", **common)
    run_dir = tmp_path / "sudoku4" / "killed"
    kill_after_checkpoint(args, run_dir, kill_after)
    summary = run(compose(args + [f"load_checkpoint={run_dir}"]))
    assert summary["status"] == "finished" and summary["final_step"] == 24
    assert_same_training_state(reference, run_dir)
    assert read_records(run_dir) == read_records(reference), f"metrics differ (killed after step {kill_after})"
    assert list_checkpoints(run_dir)
