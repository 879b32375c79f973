"""The ``train/*`` metrics of an optimizer step: summed per supervision step, reduced once, divided once.

Losses average over every sample and supervision step run (all ranks); ``accuracy``,
``exact_accuracy``, ``q_halt_accuracy`` and ``steps`` average over the samples that halted at this
step and are left out of the record when none did.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from jd.splits import SplitSpec
from models.recursive_reasoning.act import ACTCarry
from training.data_feed import DataFeed

SUM_METRICS = ("count", "sample_steps", "accuracy", "exact_accuracy", "q_halt_accuracy", "steps", "lm_loss", "q_halt_loss", "q_continue_loss")
"""The per-supervision-step sums behind the ``train/*`` metrics (``count``: samples that halted)."""


class Accumulated(NamedTuple):
    """An optimizer step's backward: the summed metrics (this rank), the ``jd/*`` metrics, and whether the JD
    step skipped a micro-batch as non-finite."""

    sums: Tensor
    jd_metrics: dict[str, float]
    jd_skipped: bool


class StepRecorder:
    """Observes every supervision step of one optimizer step: sums its metrics (this rank) and reports it
    to hard-example sampling (:meth:`training.data_feed.DataFeed.record`).

    Args:
        data: the run's data feed.
        split: the JD split (a supervision stack reports once more at each stack's end).
        device: where the sums live.
    """

    def __init__(self, data: DataFeed, split: SplitSpec, device: torch.device) -> None:
        self.data, self.split = data, split
        self.sums = torch.zeros(len(SUM_METRICS), device=device)
        self._last: tuple[dict[str, Tensor], ACTCarry, Tensor] | None = None

    def on_step(self, batch: dict[str, Tensor], carry: ACTCarry, metrics: dict[str, Tensor], outputs: dict[str, Tensor]) -> None:
        """One supervision step's metrics and outcome (a :data:`training.supervision.StepObserver`)."""
        metrics["sample_steps"] = torch.tensor(float(carry.halted.shape[0]), device=self.sums.device)
        self.sums += torch.stack([metrics[name].float() if name in metrics else self.sums.new_zeros(()) for name in SUM_METRICS])
        in_stack = self.split.is_supervision_stack
        self.data.record(batch, carry.data["puzzle_identifiers"], carry.halted, outputs["exact"], in_stack=in_stack, after_stack=False)
        self._last = (batch, carry, outputs["exact"])

    def end_micro_batch(self) -> None:
        """After a micro-batch's supervision steps: a supervision stack's end counts for sampling."""
        if self.split.is_supervision_stack and self._last is not None:
            batch, carry, exact = self._last
            self.data.record(batch, carry.data["puzzle_identifiers"], carry.halted, exact, in_stack=True, after_stack=True)


def train_metrics(sums: Tensor, lr: float, grad_norm: float, skipped_nonfinite: int, step_time_s: float, extra: dict[str, Any]) -> dict[str, float]:
    """The ``train/*`` record of a step from its :data:`SUM_METRICS` (summed over ranks) and the step's figures.

    Example:
        >>> sums = torch.tensor([2.0, 8.0, 1.5, 1.0, 2.0, 6.0, 16.0, 4.0, 0.0])
        >>> record = train_metrics(sums, lr=1e-4, grad_norm=0.5, skipped_nonfinite=0, step_time_s=0.1, extra={})
        >>> record["train/lm_loss"], record["train/accuracy"], record["train/halted_count"]
        (2.0, 0.75, 2.0)
    """
    values = dict(zip(SUM_METRICS, sums.tolist()))
    halted = values.pop("count")
    loss_divisor = values.pop("sample_steps")  # samples x supervision steps run, over all ranks
    out = {
        f"train/{name}": value / (loss_divisor if name.endswith("loss") else halted)
        for name, value in values.items()
        if name.endswith("loss") or halted > 0
    }
    out["train/halted_count"] = halted
    out["train/lr"] = lr
    out["train/grad_norm"] = grad_norm
    out["train/skipped_nonfinite"] = float(skipped_nonfinite)
    out["train/step_time_s"] = step_time_s
    out.update(extra)
    return out
