"""The per-puzzle learned embedding, trained sparsely with sign-SGD.

Only the rows of the puzzles in a batch receive a gradient, so the table is a buffer, not a
parameter: in training each forward copies the batch's rows into a fresh leaf tensor (``rows``) that
takes part in autograd (and in the Jacobian of JD), and :class:`SignSGDSparseEmbedding` later folds
their gradients back into the table.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn


class SparsePuzzleEmbedding(nn.Module):
    """A ``[num_puzzles, dim]`` table of puzzle embeddings with sparse updates.

    Example:
        >>> emb = SparsePuzzleEmbedding(num_embeddings=10, embedding_dim=4, cast_to=torch.float32)
        >>> out = emb(torch.tensor([3, 3, 7]))
        >>> out.shape, len(emb.pending_rows())
        (torch.Size([3, 4]), 1)
    """

    weights: Tensor  # a buffer (register_buffer): trained by the sign-SGD below, not by autograd

    def __init__(self, num_embeddings: int, embedding_dim: int, cast_to: torch.dtype, init_std: float = 0.0) -> None:
        super().__init__()
        self.cast_to = cast_to
        weights = torch.zeros(num_embeddings, embedding_dim)
        if init_std > 0:
            weights.normal_(std=init_std)
        self.register_buffer("weights", weights, persistent=True)
        self._pending: list[tuple[Tensor, Tensor]] = []
        self._sharing = False

    def forward(self, ids: Tensor) -> Tensor:
        if not self.training or not torch.is_grad_enabled():
            return self.weights[ids].to(self.cast_to)
        if self._sharing and self._pending and torch.equal(self._pending[-1][0], ids):
            return self._pending[-1][1].to(self.cast_to)  # the same leaf as the previous forward (share_rows)
        rows = self.weights[ids].detach().clone().requires_grad_(True)
        self._pending.append((ids.detach(), rows))
        return rows.to(self.cast_to)

    @contextlib.contextmanager
    def share_rows(self, enabled: bool = True) -> Iterator[None]:
        """Within this block, a forward on the same ids as the previous one reuses its leaf, so the rows are
        one Jacobian column block for all those forwards (the JD study's supervision stacks), not one per forward.

        >>> emb = SparsePuzzleEmbedding(num_embeddings=10, embedding_dim=4, cast_to=torch.float32)
        >>> with emb.share_rows():
        ...     _ = emb(torch.tensor([3, 7])), emb(torch.tensor([3, 7]))
        >>> len(emb.pending_rows())
        1
        """
        previous, self._sharing = self._sharing, enabled
        try:
            yield
        finally:
            self._sharing = previous

    def pending_rows(self) -> list[tuple[Tensor, Tensor]]:
        """``(ids, rows)`` leaves of every training forward since the last :meth:`clear_pending`."""
        return list(self._pending)

    def clear_pending(self) -> None:
        self._pending.clear()


class SignSGDSparseEmbedding(torch.optim.Optimizer):
    """Sign-SGD with decoupled weight decay for :class:`SparsePuzzleEmbedding` tables.

    Each step gathers the row gradients of every pending forward (from all ranks when distributed),
    sums the gradients of rows that share a puzzle id, and updates only those rows::

        w[id] <- w[id] * (1 - lr * weight_decay) - lr * sign(sum of grads for id)

    The learning rate lives in ``param_groups`` so the trainer's schedule can set it.
    """

    def __init__(self, embeddings: list[SparsePuzzleEmbedding], lr: float, weight_decay: float, world_size: int = 1) -> None:
        self.embeddings = embeddings
        self.world_size = world_size
        super().__init__([emb.weights for emb in embeddings], dict(lr=lr, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]  # no closure: the loss is never re-evaluated
        group = self.param_groups[0]
        lr, weight_decay = group["lr"], group["weight_decay"]
        for embedding in self.embeddings:
            pending = [(ids, rows.grad) for ids, rows in embedding.pending_rows() if rows.grad is not None]
            embedding.clear_pending()
            if not pending:
                ids = torch.zeros(0, dtype=torch.long, device=embedding.weights.device)
                grads = torch.zeros(0, embedding.weights.shape[1], device=embedding.weights.device)
            else:
                ids = torch.cat([item[0] for item in pending])
                grads = torch.cat([item[1] for item in pending]).float()
            if self.world_size > 1:
                ids, grads = _all_gather_rows(ids, grads, self.world_size)
            if ids.numel() == 0:
                continue
            unique_ids, inverse = ids.unique(return_inverse=True)
            summed = torch.zeros(len(unique_ids), grads.shape[1], device=grads.device, dtype=grads.dtype)
            summed.index_add_(0, inverse, grads)
            rows = embedding.weights[unique_ids]
            rows.mul_(1 - lr * weight_decay).add_(summed.sign(), alpha=-lr)
            embedding.weights[unique_ids] = rows


def _all_gather_rows(ids: Tensor, grads: Tensor, world_size: int) -> tuple[Tensor, Tensor]:
    """All-gather variable-length (ids, grads) from every rank."""
    count = torch.tensor([ids.numel()], device=ids.device)
    counts = [torch.zeros_like(count) for _ in range(world_size)]
    dist.all_gather(counts, count)
    longest = int(max(c.item() for c in counts))
    padded_ids = torch.zeros(longest, dtype=ids.dtype, device=ids.device)
    padded_grads = torch.zeros(longest, grads.shape[1], dtype=grads.dtype, device=grads.device)
    padded_ids[: ids.numel()] = ids
    padded_grads[: ids.numel()] = grads
    all_ids = [torch.zeros_like(padded_ids) for _ in range(world_size)]
    all_grads = [torch.zeros_like(padded_grads) for _ in range(world_size)]
    dist.all_gather(all_ids, padded_ids)
    dist.all_gather(all_grads, padded_grads)
    keep = [slice(0, int(c.item())) for c in counts]
    return (
        torch.cat([rank_ids[k] for rank_ids, k in zip(all_ids, keep)]),
        torch.cat([rank_grads[k] for rank_grads, k in zip(all_grads, keep)]),
    )
