"""The non-finite guard: a step whose loss, JD objectives, Gramian or gradients hold a NaN or an Inf is
skipped (no optimizer, sparse-embedding or EMA update); after ``max_nonfinite_steps`` skipped steps in a
row the run stops with :class:`NonFiniteError` and writes nothing, so its newest checkpoint is the last
good state. Every rank decides the same, from one all-reduce that also sums the step's metrics.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from models.sparse_embedding import SparsePuzzleEmbedding
from training.state import Progress


class NonFiniteError(RuntimeError):
    """Too many optimizer steps in a row were non-finite, or an update made the parameters non-finite."""


class NonFiniteGuard:
    """Decides whether a step is finite, and when too many in a row were not.

    Args:
        max_consecutive: ``max_nonfinite_steps``.
        world_size: ranks that must agree (one all-reduce per step when more than one).
    """

    def __init__(self, max_consecutive: int, world_size: int) -> None:
        self.max_consecutive = max_consecutive
        self.world_size = world_size

    def check(
        self, sums: Tensor, params: Sequence[Tensor], *, jd_skipped: bool, embedding: SparsePuzzleEmbedding | None
    ) -> tuple[bool, Tensor, Tensor]:
        """Whether the step is finite on every rank; also returns ``sums`` summed over ranks and the global
        gradient norm of ``params`` (one host synchronisation in all)."""
        local_bad = torch.zeros(1, device=sums.device)  # non-finite signs only this rank can see
        if jd_skipped:  # non-finite objectives, Gramian or update
            local_bad += 1
        for _, rows in embedding.pending_rows() if embedding is not None else []:  # the step's puzzle rows
            if rows.grad is not None:
                local_bad += (~torch.isfinite(rows.grad)).any()
        grad_norm = _grad_norm([p.grad for p in params if p.grad is not None])
        checks = torch.cat([sums, local_bad])
        if self.world_size > 1:
            dist.all_reduce(checks)
        finite = bool(torch.isfinite(grad_norm.to(checks.device)) & torch.isfinite(checks).all() & (checks[-1] == 0))
        return finite, checks[:-1], grad_norm

    @staticmethod
    def record(progress: Progress, finite: bool) -> None:
        """Count the step in ``progress`` (consecutive and total skipped steps)."""
        if finite:
            progress.consecutive_nonfinite = 0
        else:
            progress.skipped_nonfinite += 1
            progress.consecutive_nonfinite += 1

    def too_many(self, progress: Progress) -> bool:
        return progress.consecutive_nonfinite >= self.max_consecutive

    def message(self, progress: Progress, last_good: str) -> str:
        """Why the run stopped, naming the skipped steps and where the last good state is."""
        first = progress.step - progress.consecutive_nonfinite + 1
        return (
            f"{progress.consecutive_nonfinite} optimizer steps in a row (steps {first}-{progress.step}) had non-finite "
            f"losses, objectives or gradients (max_nonfinite_steps={self.max_consecutive}); they were skipped and "
            f"the run stopped without saving: {last_good}"
        )


def _grad_norm(grads: Sequence[Tensor]) -> Tensor:
    """The global 2-norm of ``grads`` (non-finite when one of them holds a NaN or an Inf)."""
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(list(grads))))
