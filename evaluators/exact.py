"""Exact-match accuracy (every scored token right) with a Wilson 95% confidence interval."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from models.loss_terms import IGNORE_LABEL_ID


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion ``successes / n``; ``(0, 1)`` when ``n == 0``."""
    if not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    z2 = z * z
    denominator = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denominator
    half_width = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denominator
    return max(0.0, centre - half_width), min(1.0, centre + half_width)


class ExactMatchEvaluator:
    """Counts examples whose predictions equal the labels on every non-ignored token.

    Padding rows (``example_index == -1``) and rows without any scored token are skipped (as in the
    reference TRM metrics). Counts are summed across ranks when
    ``torch.distributed`` is initialised and ``world_size > 1``; metrics are returned on rank 0.
    """

    required_outputs = {"preds"}

    def __init__(self, name: str = "exact") -> None:
        self.name = name
        self.correct = 0
        self.count = 0

    def begin_eval(self) -> None:
        self.correct = 0
        self.count = 0

    def update_batch(self, batch: dict[str, Tensor], outputs: dict[str, Tensor]) -> None:
        labels = batch["labels"].detach().cpu()
        preds = outputs["preds"].detach().cpu()
        if preds.shape != labels.shape:
            raise ValueError(f"preds shape {tuple(preds.shape)} differs from labels shape {tuple(labels.shape)}")
        scored = labels != IGNORE_LABEL_ID
        real = (batch["example_index"].detach().cpu() >= 0) & scored.any(dim=-1)
        exact = ((preds == labels) | ~scored).all(dim=-1)
        self.correct += int((exact & real).sum())
        self.count += int(real.sum())

    def result(self, save_dir: Path | None, rank: int, world_size: int) -> dict[str, float] | None:
        correct, count = self.correct, self.count
        if world_size > 1 and dist.is_available() and dist.is_initialized():
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
            totals = torch.tensor([correct, count], dtype=torch.int64, device=device)
            dist.all_reduce(totals)
            correct, count = int(totals[0]), int(totals[1])
        if rank != 0:
            return None
        low, high = wilson_interval(correct, count)
        return {
            f"{self.name}/exact_accuracy": correct / count if count else 0.0,
            f"{self.name}/exact_accuracy_ci_low": low,
            f"{self.name}/exact_accuracy_ci_high": high,
            f"{self.name}/count": float(count),
        }
