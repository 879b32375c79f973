"""Hard-example sampling (``custom_sampling=true``): the JD study's rule for choosing puzzles within a group.

Training counts, per puzzle identifier, how often a sample of it finished (halted) and how often its
answer was then exactly right. At the end of every data iteration (``eval_interval`` epochs, as the
study's loop recomputed its weights once per iteration) the counts are summed over all ranks and each
puzzle gets the weight ``1 - correct / (seen + 1)``; the next iterations pick the puzzle of each group
with probability proportional to its weight (uniformly when a group's weights sum to zero), so puzzles
the model already solves are drawn less. Counts accumulate over the whole run.

The plan stays a function of ``(seed, iteration)`` and of the weights fixed at the iteration's start, so
the counts are part of the checkpoint (:meth:`HardExampleSampler.state_dict`) and a resumed run samples
exactly what an uninterrupted one does. Only puzzles with different identifiers can be told apart:
ARC augmentations each have one; the Sudoku and Maze builders give every puzzle the blank identifier,
so there the rule leaves sampling uniform.

``custom_sampling_rule=study`` reproduces the JD study's code, two defects included: each optimizer
step counts every sample of the *incoming* batch as seen (every position, every step; a supervision
stack counts its batch once) and credits "correct" to the incoming batch's identifier at the position
of a sample that halted right, which is another puzzle's sample when the carry replaced it; and the
weights, keyed by identifier, are looked up by puzzle index when the next iteration draws.

Example:
    >>> sampler = HardExampleSampler(num_identifiers=3, device=torch.device("cpu"), world_size=1)
    >>> sampler.observe(torch.tensor([1, 1, 2]), halted=torch.tensor([True, True, False]), exact=torch.tensor([True, False, True]))
    >>> sampler.end_iteration().tolist()  # identifier 1: seen 2, right once -> 1 - 1/3
    [1.0, 0.6666666666666667, 1.0]
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from dataset.puzzle_dataset import PuzzleDataset

SAMPLING_RULES = ("halted", "study")
"""``custom_sampling_rule`` values: this toolkit's counting, or the JD study's (module docstring)."""


class HardExampleSampler:
    """Per-identifier counts of finished and exactly-right training samples, and the weights they give.

    Args:
        num_identifiers: rows of the puzzle-identifier space (the training data's ``num_puzzle_identifiers``).
        device: where this rank's counts since the last synchronisation accumulate (the training device).
        world_size: ranks whose counts are summed (every rank must call :meth:`sync` and
            :meth:`end_iteration` together).
    """

    def __init__(self, num_identifiers: int, device: torch.device, world_size: int, rule: str = "halted") -> None:
        if rule not in SAMPLING_RULES:
            raise ValueError(f"custom_sampling_rule={rule!r}; accepted: {', '.join(SAMPLING_RULES)}")
        self.rule = rule
        self.world_size = world_size
        self._pending = torch.zeros(2, num_identifiers, dtype=torch.float64, device=device)  # seen, correct
        self.totals = torch.zeros(2, num_identifiers, dtype=torch.float64)  # over all ranks, synchronised
        self.boundary = self.totals.clone()  # the totals the current iteration's weights came from

    def observe(self, identifiers: Tensor, halted: Tensor, exact: Tensor) -> None:
        """Count the samples of one supervision step that halted (``exact``: their answer was right)."""
        ids = identifiers[halted].long()
        self._pending[0].index_add_(0, ids, torch.ones_like(ids, dtype=torch.float64))
        self._pending[1].index_add_(0, ids, exact[halted].to(torch.float64))

    def observe_incoming(self, incoming: Tensor, halted: Tensor, exact: Tensor) -> None:
        """The study's counting (``rule="study"``): every identifier of the incoming batch seen once, and
        credited "correct" where the sample at its position halted right, whichever puzzle that sample was."""
        ids = incoming.long()
        self._pending[0].index_add_(0, ids, torch.ones_like(ids, dtype=torch.float64))
        self._pending[1].index_add_(0, ids, (halted & exact).to(torch.float64))

    def record(self, carried: Tensor, incoming: Tensor, halted: Tensor, exact: Tensor, *, in_stack: bool, after_stack: bool) -> None:
        """Count one supervision step by this sampler's rule, called after every step and once more after a
        supervision stack (``after_stack``): ``carried`` are the identifiers of the carry's samples,
        ``incoming`` those of the batch fed. Rule ``halted`` counts halted samples by their own identifier at
        every step; rule ``study`` credits the incoming batch, once per stack (``in_stack``) or per step."""
        if self.rule == "halted":
            if not after_stack:
                self.observe(carried, halted, exact)
        elif after_stack or not in_stack:
            self.observe_incoming(incoming, halted, exact)

    def sync(self) -> None:
        """Add every rank's counts since the last call to :attr:`totals` (a collective when distributed)."""
        if self.world_size > 1:
            dist.all_reduce(self._pending)
        self.totals += self._pending.cpu()
        self._pending.zero_()

    def end_iteration(self) -> np.ndarray:
        """Synchronise, fix the weights for the next iteration and return them per identifier."""
        self.sync()
        self.boundary = self.totals.clone()
        return self.identifier_weights()

    def identifier_weights(self) -> np.ndarray:
        """``1 - correct / (seen + 1)`` per identifier, from the counts at the last iteration boundary."""
        seen, correct = self.boundary.numpy()
        return 1.0 - correct / (seen + 1.0)

    def apply(self, data: PuzzleDataset) -> dict[str, float]:
        """Make ``data`` draw by :meth:`identifier_weights`; return ``train/sampling_weight_min|mean`` over its puzzles."""
        data.set_puzzle_weights(self.identifier_weights(), by_puzzle_index=self.rule == "study")
        weights = data.puzzle_weights()
        return {"train/sampling_weight_min": float(weights.min()), "train/sampling_weight_mean": float(weights.mean())}

    def state_dict(self) -> dict[str, Any]:
        """The synchronised counts (call :meth:`sync` first on every rank)."""
        return {"totals": self.totals.clone(), "boundary": self.boundary.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        totals, boundary = state["totals"], state["boundary"]
        if tuple(totals.shape) != tuple(self.totals.shape) or tuple(boundary.shape) != tuple(self.boundary.shape):
            raise ValueError(f"hard-example counts for {tuple(totals.shape)[-1]} identifiers, the data has {self.totals.shape[1]}")
        self.totals = totals.to(torch.float64).cpu().clone()
        self.boundary = boundary.to(torch.float64).cpu().clone()
        self._pending.zero_()
