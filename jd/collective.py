"""The few collectives the JD step needs, on one process group."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


class Collective:
    """Collectives on ``group`` (all ranks when ``None``)."""

    def __init__(self, world_size: int, group: Any) -> None:
        self.world_size = world_size
        self.group = group

    @property
    def rank(self) -> int:
        """This process's rank within ``group``."""
        return dist.get_rank(self.group)

    def all_reduce(self, tensor: Tensor, op: Any = dist.ReduceOp.SUM) -> Tensor:
        """Reduce ``tensor`` in place over the group (sum by default) and return it."""
        dist.all_reduce(tensor, op=op, group=self.group)
        return tensor

    def broadcast_from_first(self, tensor: Tensor) -> Tensor:
        """Overwrite ``tensor`` in place with the group's first rank's copy and return it."""
        source = 0 if self.group is None else dist.get_global_rank(self.group, 0)
        dist.broadcast(tensor, src=source, group=self.group)
        return tensor

    def all_gather_rows(self, tensor: Tensor, counts: Sequence[int]) -> list[Tensor]:
        """All-gather ``[count_r, *rest]`` tensors whose first dimension differs by rank."""
        longest = max(counts)
        if longest == 0:
            return [tensor.new_zeros((0, *tensor.shape[1:])) for _ in counts]
        padded = tensor.new_zeros((longest, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        gathered = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(gathered, padded.contiguous(), group=self.group)
        return [g[:c] for g, c in zip(gathered, counts)]
