"""What one micro-batch's Jacobian-descent engine hands back, and the tensor helpers the engines share."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class JDUpdate:
    """What one micro-batch contributes, before accumulation (``None`` grads: skipped)."""

    num_objectives: int
    param_grads: list[Tensor] | None = None
    row_grads: list[Tensor] | None = None
    gramian: Tensor | None = None
    weights: Tensor | None = None
    projections: Tensor | None = None  # J d
    update_sq_norm: Tensor | None = None  # ||d||^2


def flatten_blocks(blocks: Sequence[Tensor], m: int, like: Tensor) -> Tensor:
    """Concatenate Jacobian blocks ``[m, *shape]`` into one ``[m, n]`` matrix (``[m, 0]`` when empty)."""
    if not blocks:
        return like.new_zeros(m, 0)
    return torch.cat([b.reshape(m, -1) for b in blocks], dim=1)


def unflatten(vector: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Split a flat vector into tensors shaped (and typed) like ``like``."""
    pieces = vector.split([t.numel() for t in like]) if like else []
    return [p.reshape(t.shape).to(t.dtype) for p, t in zip(pieces, like)]


def grads_of(output: Tensor, inputs: Sequence[Tensor], grad_output: Tensor | None = None, retain_graph: bool = False) -> list[Tensor]:
    """``d output / d inputs`` (zeros for inputs the output does not depend on)."""
    if not inputs:
        return []
    grads = torch.autograd.grad(output, list(inputs), grad_outputs=grad_output, retain_graph=retain_graph, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs)]


def gd_rows(objectives: Tensor, rows: Sequence[Tensor], include_puzzle_embedding: bool) -> list[Tensor] | None:
    """Rows left out of the Jacobian (``include_puzzle_embedding=false``): GD gradient of the sum."""
    if include_puzzle_embedding or not rows:
        return None
    return grads_of(objectives.sum(), rows, retain_graph=True)


def all_finite(*tensors: Tensor | None) -> bool:
    """Whether every entry of every tensor is finite (one host synchronisation)."""
    checks = [torch.isfinite(t).all() for t in tensors if t is not None]
    return bool(torch.stack(checks).all()) if checks else True


def accumulate_grad(tensor: Tensor, grad: Tensor) -> None:
    """Add ``grad`` (detached, cast to ``tensor``'s dtype) into ``tensor.grad``."""
    grad = grad.detach().to(tensor.dtype)
    if tensor.grad is None:
        tensor.grad = grad
    else:
        tensor.grad.add_(grad)


_VMAP_FALLBACK = "There is a performance drop because we have not yet implemented the batching rule"


def jacobian_blocks(objectives: Tensor, inputs: list[Tensor], parallel_chunk_size: int | None, retain_graph: bool = False) -> list[Tensor]:
    """``torchjd.autojac.jac`` of ``objectives`` w.r.t. ``inputs`` (one block per input, ``m`` rows each).

    With rows batched by ``torch.vmap`` (``parallel_chunk_size`` > 1 or None), PyTorch warns, asking for
    a bug report, when an operation (the CPU attention backward) has no batching rule and runs row by
    row; that cost is measured in the benchmark, so the warning is not shown.
    """
    from torchjd.autojac import jac

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_VMAP_FALLBACK)
        return list(jac(objectives, inputs, retain_graph=retain_graph, parallel_chunk_size=parallel_chunk_size))
