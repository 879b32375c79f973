"""The evaluator interface the trainer drives during evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from torch import Tensor


class Evaluator(Protocol):
    """Scores a model on a dataset's test split, batch by batch.

    Lifecycle, driven by the trainer (on every rank):

    1. ``begin_eval()`` once before the first batch;
    2. ``update_batch(batch, outputs)`` for each test batch, after the model has run all its ACT
       steps. ``batch`` holds ``inputs``, ``labels``, ``puzzle_identifiers`` and ``example_index``
       (global index of the example in the test split, ``-1`` for padding rows); ``outputs`` holds
       at least the keys in ``required_outputs`` (``preds`` ``[B, S]`` argmax tokens,
       ``q_halt_logits`` ``[B]``, ``logits`` ``[B, S, V]``);
    3. ``result(save_dir, rank, world_size)`` gathers what each rank saw and returns the metrics on
       rank 0 (``None`` elsewhere); it may write files (e.g. ``submission.json``) into ``save_dir``.
    """

    required_outputs: set[str]

    def begin_eval(self) -> None: ...

    def update_batch(self, batch: dict[str, Tensor], outputs: dict[str, Tensor]) -> None: ...

    def result(self, save_dir: Path | None, rank: int, world_size: int) -> dict[str, float] | None: ...
