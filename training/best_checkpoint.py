"""The best checkpoint by a held-out metric, kept beside the newest ones and never pruned by ``keep_last``.

After each evaluation the metric ``checkpoint_best`` names (the run's ``objective`` by default) is compared
with the best so far; a strictly better value writes the whole training state as ``checkpoints/best.pt``
(its progress says the evaluation is done, and it holds the updated record), beside the numbered
checkpoints, never replacing one of them. With ``ema=true`` both weights are evaluated: the averaged
weights' best goes to ``best.pt``, the live weights' (metrics ``raw/...``) to ``best_raw.pt``. The record is
part of every checkpoint, so a resumed run keeps it exactly; a run killed after an evaluation and before
its best was written redoes that evaluation when it resumes (from the checkpoint written before it) and
writes the same file.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch.distributed as dist

from dataset.atomic import atomic_open, write_failure
from training.checkpoint import BEST_NAME, BEST_RAW_NAME
from training.checkpointer import Checkpointer
from training.distributed import DistInfo
from training.errors import CheckpointError
from training.evaluation import RAW_PREFIX
from training.state import Progress

BEST_FILES = {"weights": BEST_NAME, "ema": BEST_NAME, "raw": BEST_RAW_NAME}
"""The file each kind of weights keeps its best checkpoint in (``weights``: a run without EMA)."""


def infer_mode(metric: str) -> Literal["max", "min"]:
    """``min`` for a loss, ``max`` for everything else (accuracies, pass@K).

    Example:
        >>> infer_mode("eval/lm_loss"), infer_mode("ARC/pass@2")
        ('min', 'max')
    """
    return "min" if "loss" in metric.rsplit("/", 1)[-1] else "max"


@dataclass
class Best:
    """The best evaluation so far of one kind of weights."""

    step: int
    value: float


class BestCheckpoint:
    """Tracks the best evaluation of each kind of weights and keeps its checkpoint (see the module docstring).

    Args:
        metric: the evaluation metric compared (e.g. ``eval/exact_accuracy``, ``ARC/pass@2``).
        mode: ``max`` or ``min``.
        kinds: ``("weights",)`` without EMA, ``("ema", "raw")`` or ``("ema",)`` with it; ``()`` tracks nothing.
        dist_info: every rank learns rank 0's decision (all take part in the checkpoint).

    Example:
        >>> from training.distributed import DistInfo
        >>> import torch
        >>> best = BestCheckpoint("eval/exact_accuracy", "max", ("weights",), DistInfo(0, 1, 0, torch.device("cpu")))
        >>> best.improved({"eval/exact_accuracy": 0.5}, step=10), best.improved({"eval/exact_accuracy": 0.4}, step=20)
        (['weights'], [])
        >>> best.summary(Path("run"))["weights"]
        {'step': 10, 'value': 0.5, 'path': 'run/checkpoints/best.pt'}
    """

    def __init__(self, metric: str, mode: Literal["max", "min"], kinds: tuple[str, ...], dist_info: DistInfo) -> None:
        self.metric, self.mode, self.kinds, self.dist = metric, mode, kinds, dist_info
        self.records: dict[str, Best] = {}

    def _key(self, kind: str) -> str:
        return RAW_PREFIX + self.metric if kind == "raw" else self.metric

    def _better(self, value: float, record: Best | None) -> bool:
        if not math.isfinite(value):
            return False
        if record is None:
            return True
        return value > record.value if self.mode == "max" else value < record.value

    def improved(self, results: dict[str, float], step: int) -> list[str]:
        """The kinds whose metric in ``results`` (rank 0's) beats their record; the records are updated on every rank."""
        decision: dict[str, float] = {}
        if self.dist.is_main:
            for kind in self.kinds:
                value = results.get(self._key(kind))
                if value is not None and self._better(float(value), self.records.get(kind)):
                    decision[kind] = float(value)
        if self.dist.world_size > 1:
            box: list[Any] = [decision]
            dist.broadcast_object_list(box, src=0)
            decision = box[0]
        for kind, value in decision.items():
            self.records[kind] = Best(step, value)
        return list(decision)

    def after_evaluation(self, results: dict[str, float], progress: Progress, checkpointer: Checkpointer) -> None:
        """Write the evaluated state as the best of every kind it improves (never after a skipped step)."""
        if progress.consecutive_nonfinite:
            return
        kinds = self.improved(results, progress.step)
        files = list(dict.fromkeys(BEST_FILES[kind] for kind in kinds))
        if not files:
            return
        assert checkpointer.run_dir is not None
        folder = checkpointer.run_dir / "checkpoints"
        written = checkpointer.save_as(progress, folder / files[0])  # the record is in it; its progress says evaluated
        if written is not None and len(files) > 1:
            self._copy(written, folder / files[1])

    def _copy(self, source: Path, target: Path) -> None:
        try:
            with open(source, "rb") as original, atomic_open(target, "wb") as copy:
                shutil.copyfileobj(original, copy)
        except OSError as error:
            raise CheckpointError(f"cannot write the best checkpoint {target}: {write_failure(target.parent, error)}") from None

    def after_restore(self, *, same_run: bool) -> None:
        """A new run started from another run's state tracks its own best from scratch."""
        if not same_run:
            self.reset()

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        records = {kind: {"step": record.step, "value": record.value} for kind, record in self.records.items()}
        return {"metric": self.metric, "mode": self.mode, "records": records}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state.get("metric"), state.get("mode")) != (self.metric, self.mode):
            if self.dist.is_main:
                print(
                    f"note: the checkpoint tracked its best by {state.get('metric')} ({state.get('mode')}), this run by {self.metric} "
                    f"({self.mode}): the best is tracked afresh from here",
                    flush=True,
                )
            self.reset()
            return
        self.records = {kind: Best(int(record["step"]), float(record["value"])) for kind, record in state["records"].items() if kind in self.kinds}

    def reset(self) -> None:
        """No best yet (a new run, or a checkpoint written before best checkpoints were kept)."""
        self.records = {}

    def summary(self, run_dir: Path) -> dict[str, Any]:
        """What ``summary.json`` says of the best: the metric, and per kind its step, value and file (``{}``: not tracked)."""
        if not self.kinds:
            return {}
        out: dict[str, Any] = {"metric": self.metric, "mode": self.mode}
        for kind, record in self.records.items():
            out[kind] = {"step": record.step, "value": record.value, "path": str(run_dir / "checkpoints" / BEST_FILES[kind])}
        return out
