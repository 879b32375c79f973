"""What a run prints while it trains: a progress bar (rank 0, ``progress_bar=true``) with the loss and the
last training accuracy seen."""

from __future__ import annotations

from typing import Any


class ProgressBar:
    """A tqdm bar over the run's optimizer steps; every method is a no-op when it is switched off.

    Args:
        enabled: show it (rank 0 with ``progress_bar=true``).
        total, initial: the run's steps, and the step it starts from.
        desc: the run's name.
    """

    def __init__(self, *, enabled: bool, total: int, initial: int, desc: str) -> None:
        self._bar: Any = None
        self._accuracy = float("nan")  # the last step where some samples halted
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)

    def update(self, metrics: dict[str, float]) -> None:
        """One more step, showing its ``train/lm_loss`` and the latest ``train/accuracy``."""
        if self._bar is None:
            return
        self._bar.update(1)
        self._accuracy = metrics.get("train/accuracy", self._accuracy)
        self._bar.set_postfix(loss=f"{metrics.get('train/lm_loss', float('nan')):.3f}", acc=f"{self._accuracy:.3f}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
