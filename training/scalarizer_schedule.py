"""When a stateful scalarizer steps: DWA at every epoch's end, FAMO after every optimizer step.

The trainer's data position is ``(iteration, batch_in_iteration)``, an iteration covering
``epochs_per_iter`` epochs of about equal numbers of batches; an epoch ends when the global epoch
index ``iteration * epochs_per_iter + floor(batch / batches_per_epoch)`` moves. It depends on the
position only, so a resumed run steps DWA exactly where an uninterrupted one does.
"""

from __future__ import annotations

import math

from dataset.puzzle_dataset import PuzzleDataset
from jd.scalarizers import ScalarizerStep


class ScalarizerSchedule:
    """Calls :meth:`ScalarizerStep.end_epoch` when an optimizer step crossed an epoch boundary.

    Args:
        scalarizer: the JD step's scalarizer (``None``: nothing to schedule).
        data: the training data (its number of batches per iteration).
        epochs_per_iter: epochs one data iteration covers.
    """

    def __init__(self, scalarizer: ScalarizerStep | None, data: PuzzleDataset, epochs_per_iter: int) -> None:
        self.scalarizer = scalarizer if scalarizer is not None and scalarizer.has_epochs else None
        self.data = data
        self.epochs_per_iter = epochs_per_iter

    def epoch_index(self, iteration: int, batch: int) -> int:
        """The global index of the epoch that position ``(iteration, batch)`` has reached."""
        per_epoch = self.data.num_train_batches(iteration) / self.epochs_per_iter
        return iteration * self.epochs_per_iter + min(math.floor(batch / per_epoch), self.epochs_per_iter)

    def after_step(self, before: tuple[int, int], after: tuple[int, int]) -> None:
        """Roll DWA's history once per epoch boundary crossed between the positions ``before`` and ``after``."""
        if self.scalarizer is None:
            return
        for _ in range(self.epoch_index(*after) - self.epoch_index(*before)):
            self.scalarizer.end_epoch()
