"""Exponential moving average of a model's weights, used for evaluation when ``ema=True``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn


class EMA:
    """Keeps ``shadow = rate * shadow + (1 - rate) * weights`` for every parameter (as the reference does;
    buffers such as the sparse puzzle-embedding table stay live).

    Example:
        >>> layer = nn.Linear(2, 2)
        >>> ema = EMA(layer, rate=0.9)
        >>> with torch.no_grad():
        ...     _ = layer.weight.add_(1.0)
        >>> ema.update(layer)
        >>> with ema.swapped_into(layer):
        ...     pass  # evaluate with the averaged weights here
    """

    def __init__(self, model: nn.Module, rate: float) -> None:
        self.rate = rate
        self.shadow: dict[str, Tensor] = {name: value.detach().clone() for name, value in _float_state(model)}

    def reset(self, model: nn.Module) -> None:
        """Start the average again from ``model``'s current weights."""
        self.shadow = {name: value.detach().clone() for name, value in _float_state(model)}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for name, value in _float_state(model):
            self.shadow[name].lerp_(value.detach(), 1.0 - self.rate)

    @contextlib.contextmanager
    def swapped_into(self, model: nn.Module) -> Iterator[None]:
        """Temporarily load the averaged weights into ``model``; restore the live ones on exit."""
        live = {name: value.detach().clone() for name, value in _float_state(model)}
        _copy_into(model, self.shadow)
        try:
            yield
        finally:
            _copy_into(model, live)

    def state_dict(self) -> dict[str, Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise ValueError(f"EMA state lacks {sorted(missing)[:5]}")
        for name, value in state.items():
            if name in self.shadow:
                self.shadow[name].copy_(value)


def _float_state(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    for name, value in model.named_parameters():
        if value.is_floating_point():
            yield name, value


@torch.no_grad()
def _copy_into(model: nn.Module, values: dict[str, Tensor]) -> None:
    for name, value in _float_state(model):
        value.copy_(values[name])
