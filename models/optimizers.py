"""Weight optimizer (Adam-atan2) and the learning-rate schedule.

``AdamATan2`` is the pure-PyTorch form of the update rule of the ``adam-atan2`` package, which the
reference TRM uses through a fused CUDA kernel; :func:`make_adam_atan2` returns the fused one when it
is importable and the parameters live on CUDA, and this class otherwise. With step ``t``::

    p <- p * (1 - lr * weight_decay)
    m <- beta1 * m + (1 - beta1) * g
    v <- beta2 * v + (1 - beta2) * g^2
    p <- p - lr / (1 - beta1^t) * atan2(m, sqrt(v) / sqrt(1 - beta2^t))

``atan2`` replaces Adam's ``m / (sqrt(v) + eps)``: it is bounded and needs no epsilon.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor


class AdamATan2(torch.optim.Optimizer):
    """Adam with ``atan2`` in place of the division (pure PyTorch, any device).

    Example:
        >>> p = torch.nn.Parameter(torch.tensor([1.0]))
        >>> opt = AdamATan2([p], lr=0.1, betas=(0.9, 0.95), weight_decay=0.0)
        >>> p.grad = torch.tensor([2.0]); opt.step()
        >>> round(p.item(), 4)  # m = 0.2, v = 0.2: 1 - 0.1 / 0.1 * atan2(0.2, sqrt(0.2) / sqrt(0.05))
        0.9003
    """

    def __init__(self, params: Iterable[Tensor], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 1e-2) -> None:
        if lr < 0 or weight_decay < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"invalid AdamATan2 hyper-parameters lr={lr} betas={betas} weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]  # no closure: the loss is never re-evaluated
        for group in self.param_groups:
            lr, (beta1, beta2), weight_decay = group["lr"], group["betas"], group["weight_decay"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["step"] += 1
                step = float(state["step"])
                grad = param.grad
                param.mul_(1 - lr * weight_decay)
                state["exp_avg"].lerp_(grad, 1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2**step)
                param.add_(torch.atan2(state["exp_avg"], denom), alpha=-lr / (1 - beta1**step))


def make_adam_atan2(params: Sequence[Tensor], lr: float, betas: tuple[float, float], weight_decay: float) -> torch.optim.Optimizer:
    """The fused ``adam_atan2.AdamATan2`` on CUDA when installed (``pip install .[cuda]``), else :class:`AdamATan2`.

    Both keep the same state keys (``step``, ``exp_avg``, ``exp_avg_sq``), so checkpoints move between them.
    """
    if params and params[0].is_cuda:
        try:
            from adam_atan2 import AdamATan2 as FusedAdamATan2
        except ImportError:
            pass
        else:
            return FusedAdamATan2(params, lr=lr, betas=betas, weight_decay=weight_decay)
    return AdamATan2(params, lr=lr, betas=betas, weight_decay=weight_decay)


def cosine_schedule_with_warmup(step: int, *, base_lr: float, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Linear warm-up to ``base_lr`` over ``warmup_steps``, then cosine decay to ``min_ratio * base_lr`` at ``total_steps``.

    Example:
        >>> [round(cosine_schedule_with_warmup(s, base_lr=1.0, warmup_steps=2, total_steps=6, min_ratio=0.0), 2) for s in range(7)]
        [0.0, 0.5, 1.0, 0.85, 0.5, 0.15, 0.0]
    """
    if step < warmup_steps:
        return base_lr * step / max(1, warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(progress, 1.0)
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))
