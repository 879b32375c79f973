"""When a run logs, evaluates and ends: decided from the progress record alone, so a resumed run
follows the schedule an uninterrupted one does (checkpoints: :class:`training.checkpointer.Checkpointer`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from models.optimizers import cosine_schedule_with_warmup
from training.checkpointer import Checkpointer
from training.config import TrainConfig
from training.run_dir import logged_evaluation
from training.state import Progress

Evaluate = Callable[[], dict[str, float]]
"""Runs the evaluation of the current step and returns its metrics."""


class Cadence:
    """The run's schedule: logging, evaluation, the checkpoints around evaluations, the learning rate.

    Args:
        config: ``log_interval``, ``eval_interval`` (epochs per data iteration), ``min_eval_interval``,
            ``eval_steps`` (extra evaluations at these optimizer steps), ``epochs``, the LR warm-up and decay.
        total_steps: the optimizer steps the run takes.
        is_main: this rank prints the notes.

    Example:
        >>> from training.config import TrainConfig
        >>> cadence = Cadence(TrainConfig(data_paths=["d"], global_batch_size=8, lr=1e-4, epochs=4, log_interval=10), total_steps=100)
        >>> [cadence.log_due(step) for step in (1, 5, 10)]
        [True, False, True]
    """

    def __init__(self, config: TrainConfig, total_steps: int, *, is_main: bool = True) -> None:
        self.config = config
        self.total_steps = total_steps
        self.is_main = is_main
        self.evaluated_step: int | None = None  # the step of the last evaluation this process ran (or found logged)

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

    def lr_scale(self, step: int) -> float:
        """The learning-rate factor at ``step``: linear warm-up, then cosine decay to ``lr_min_ratio``."""
        config = self.config
        return cosine_schedule_with_warmup(
            step, base_lr=1.0, warmup_steps=config.lr_warmup_steps, total_steps=self.total_steps, min_ratio=config.lr_min_ratio
        )

    def after_step(self, progress: Progress, iteration_before: int, checkpointer: Checkpointer, evaluate: Evaluate) -> dict[str, float]:
        """Evaluate when due (a checkpoint first, when the checkpointer wants one: a run killed during a long
        evaluation loses no training), else checkpoint when due. Returns the evaluation, if one ran."""
        finite = progress.consecutive_nonfinite == 0
        if self.evaluation_due(progress, iteration_before):
            progress.eval_pending = 1
            if checkpointer.due(progress.step, before_eval=True, finite=finite):
                checkpointer.save(progress)
            return self._evaluate(progress, evaluate)
        if checkpointer.due(progress.step, before_eval=False, finite=finite):
            checkpointer.save(progress)
        return {}

    def at_the_start(self, progress: Progress, resumed: bool, run_dir: Path, evaluate: Evaluate) -> dict[str, float]:
        """Before the first step of a resumed run: redo the evaluation its checkpoint was written for, or, when the run
        already finished, say so and return the evaluation ``summary.json`` logged (nothing is trained or written)."""
        if progress.eval_pending:
            return self._evaluate(progress, evaluate)
        if not (resumed and self.finished(progress)):
            return {}
        self.evaluated_step = progress.step
        if self.is_main:
            print(
                f"note: the run already finished at step {progress.step} (its final evaluation is logged); nothing to do: "
                "raise epochs or max_steps to train further",
                flush=True,
            )
        return logged_evaluation(run_dir)

    def at_the_end(self, progress: Progress, checkpointer: Checkpointer, evaluate: Evaluate) -> dict[str, float]:
        """The last step's evaluation (unless it just ran), with a checkpoint before and after it."""
        results: dict[str, float] = {}
        if self.evaluated_step != progress.step:
            progress.eval_pending = 1
            checkpointer.save(progress)
            results = self._evaluate(progress, evaluate)
        checkpointer.save(progress)  # the same step, now with its evaluation done
        return results

    def _evaluate(self, progress: Progress, evaluate: Evaluate) -> dict[str, float]:
        self.evaluated_step = progress.step
        return evaluate()
