"""The training data a run reads: both splits, the batch stream, the data position and hard-example sampling.

:class:`DataFeed` loads and cross-checks the datasets before anything heavy is built, hands the
trainer each optimizer step's global batches (this rank's slice; read ahead on CUDA,
:mod:`training.prefetch`), keeps the data position in the run's :class:`~training.state.Progress`, and
owns the hard-example sampler (``custom_sampling``, :mod:`training.hard_sampling`): it counts what the
supervision steps report and re-weights the puzzles at every data iteration's end. Its checkpoint state
is the sampler's counts (``sampler``); restoring checks that the saved data position exists.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from dataset.common import DatasetError
from dataset.puzzle_dataset import PuzzleDataset
from training.config import ConfigError, TrainConfig
from training.distributed import DistInfo
from training.hard_sampling import HardExampleSampler
from training.prefetch import TrainBatches
from training.state import Progress

Batch = dict[str, Tensor]


class DataFeed:
    """Both datasets of a run and the stream of its training batches.

    Args:
        config: the run's configuration (``data_paths``, ``eval_paths``, batch sizes, ``eval_interval``,
            ``custom_sampling``, ``prefetch_batches``).
        dist_info: this rank's place (each rank reads its slice of every global batch).
        progress: the run's progress record, whose ``iteration``/``batch_in_iteration`` this feed advances.

    Raises :class:`~dataset.common.DatasetError` for unreadable or malformed files and
    :class:`~training.config.ConfigError` when the two splits do not fit each other.
    """

    def __init__(self, config: TrainConfig, dist_info: DistInfo, progress: Progress) -> None:
        self.config, self.dist, self.progress = config, dist_info, progress
        self.micro_batch = config.global_batch_size // dist_info.world_size // config.grad_accum_steps
        self.epochs_per_iter = config.eval_interval or config.epochs
        self.total_iterations = math.ceil(config.epochs / self.epochs_per_iter)
        self.train = self._load(config.data_paths, "train", config.global_batch_size, epochs_per_iter=self.epochs_per_iter)
        self.test = self._load(config.eval_paths, "test", config.global_batch_size // config.grad_accum_steps)
        train_meta, test_meta = self.train.metadata, self.test.metadata
        if test_meta.seq_len != train_meta.seq_len or test_meta.vocab_size != train_meta.vocab_size:
            raise ConfigError(f"data_paths_test {config.eval_paths} do not match data_paths {config.data_paths} in seq_len / vocab_size")
        self.sampler = (
            HardExampleSampler(train_meta.num_puzzle_identifiers, dist_info.device, dist_info.world_size, rule=config.custom_sampling_rule)
            if config.custom_sampling
            else None
        )
        self.sampling_stats: dict[str, float] = self.sampler.apply(self.train) if self.sampler is not None else {}
        self._stream: TrainBatches | None = None  # opened at the first step, at the (restored) position

    def _load(self, paths: list[str], split: str, batch_size: int, **extra: Any) -> PuzzleDataset:
        try:
            return PuzzleDataset(paths, split, batch_size, rank=self.dist.rank, world_size=self.dist.world_size, seed=self.config.seed, **extra)
        except DatasetError:
            raise
        except (ValueError, TypeError, KeyError, IndexError, OSError) as error:  # malformed files the loader did not name
            raise DatasetError(f"{paths} ({split} split): malformed dataset files ({type(error).__name__}: {error})") from None

    def estimated_steps(self, batches_per_step: int) -> int:
        """Optimizer steps the configured epochs give when each step reads ``batches_per_step`` batches."""
        return max(1, self.train.estimated_total_batches(self.config.epochs) // batches_per_step)

    # ----------------------------------------------------------------------------------- stream
    def next_batches(self, count: int) -> list[Batch] | None:
        """The next ``count`` global batches (this rank's slice), or ``None`` when the data is exhausted."""
        if self._stream is None:
            depth = self.config.prefetch_batches
            if depth is None:
                depth = 2 if self.dist.device.type == "cuda" else 0
            self._stream = TrainBatches(self.progress, self.total_iterations, self.train.train_batches, self._end_iteration, depth, self.dist.device)
        batches: list[Batch] = []
        for _ in range(count):
            batch = self._stream.next()
            if batch is None:
                return None
            batches.append(batch)
        return batches

    def on_device(self, batches: list[Batch], rows: slice) -> list[Batch]:
        """Rows ``rows`` of every field of ``batches``, on the training device."""
        return [{key: value[rows].to(self.dist.device, non_blocking=True) for key, value in batch.items()} for batch in batches]

    def take_wait(self) -> float:
        """Seconds spent waiting for batches since the last call."""
        return self._stream.take_wait() if self._stream is not None else 0.0

    def close(self) -> None:
        """Stop reading ahead."""
        if self._stream is not None:
            self._stream.close()

    def _end_iteration(self) -> None:
        """After an iteration's last batch: hard-example sampling draws the next iterations by the counts so far."""
        if self.sampler is not None:
            self.sampler.end_iteration()
            self.sampling_stats = self.sampler.apply(self.train)

    def record(self, incoming: Batch, carried: Tensor, halted: Tensor, exact: Tensor, *, in_stack: bool, after_stack: bool) -> None:
        """One supervision step's outcome for hard-example sampling (nothing without ``custom_sampling``)."""
        if self.sampler is not None:
            self.sampler.record(carried, incoming["puzzle_identifiers"], halted, exact, in_stack=in_stack, after_stack=after_stack)

    # ------------------------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any] | None:
        """The hard-example counts, summed over every rank (a collective: all ranks call it)."""
        if self.sampler is None:
            return None
        self.sampler.sync()
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the counts (ignored without ``custom_sampling``) and check the restored data position."""
        if self.sampler is not None:
            self.sampler.load_state_dict(state)
            self.sampling_stats = self.sampler.apply(self.train)
        self.check_position()

    def check_position(self) -> None:
        """Raise ``ValueError`` when the progress's data position does not exist in these datasets."""
        progress = self.progress
        if progress.iteration >= self.total_iterations:
            return
        available = self.train.num_train_batches(progress.iteration)
        if progress.batch_in_iteration > available:
            raise ValueError(
                f"its data position (iteration {progress.iteration}, batch {progress.batch_in_iteration}) does not exist "
                f"with these data_paths / global_batch_size / eval_interval ({available} batches per iteration); resume with "
                "the settings the checkpoint was trained with"
            )
