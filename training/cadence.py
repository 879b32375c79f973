"""When a run logs, evaluates and ends: decided from the progress record alone, so a resumed run
follows the schedule an uninterrupted one does (checkpoints: :class:`training.checkpointer.Checkpointer`)."""

from __future__ import annotations

from training.config import TrainConfig
from training.state import Progress


class Cadence:
    """The run's schedule of logging and evaluation.

    Args:
        config: ``log_interval``, ``eval_interval`` (epochs per data iteration), ``min_eval_interval``,
            ``eval_steps`` (extra evaluations at these optimizer steps), ``epochs``.
        total_steps: the optimizer steps the run takes.

    Example:
        >>> from training.config import TrainConfig
        >>> cadence = Cadence(TrainConfig(data_paths=["d"], global_batch_size=8, lr=1e-4, epochs=4, log_interval=10), total_steps=100)
        >>> [cadence.log_due(step) for step in (1, 5, 10)]
        [True, False, True]
    """

    def __init__(self, config: TrainConfig, total_steps: int) -> None:
        self.config = config
        self.total_steps = total_steps

    def log_due(self, step: int) -> bool:
        return step % self.config.log_interval == 0 or step == 1

    def evaluation_due(self, progress: Progress, iteration_before: int) -> bool:
        """After a step that ended a data iteration (every ``eval_interval`` epochs, from ``min_eval_interval``
        on) or reached one of ``eval_steps``; never at the last step (the final evaluation follows it)."""
        config = self.config
        crossed = progress.iteration > iteration_before
        epochs_done = progress.iteration * (config.eval_interval or config.epochs)
        scheduled = crossed and bool(config.eval_interval) and epochs_done >= config.min_eval_interval
        return (scheduled or progress.step in config.eval_steps) and progress.step < self.total_steps

    def finished(self, progress: Progress) -> bool:
        return progress.step >= self.total_steps
