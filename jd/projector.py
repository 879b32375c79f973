"""A batched, exact solver of the dual-cone projections of UPGrad and DualProj, on the Gramian's device.

TorchJD's UPGrad projects each of the ``m`` Jacobian rows onto the dual cone of all rows; by
Proposition 1 of the Jacobian-descent paper each projection is the quadratic program

    minimise  v^T G v   subject to   v >= u          (one per row u of U, G = J J^T)

TorchJD's default :class:`~torchjd.linalg.QuadprogProjector` copies ``G`` to the host and solves the
``m`` programs one after the other with quadprog: about ``m^4`` work in Python-driven calls, which at
``m = 128`` takes longer than the rest of a training step. :class:`PivotingProjector` solves the same
programs, exactly, all at once and on ``G``'s device: with ``v = u + x`` they are the linear
complementarity problems

    x >= 0,   y = G x + G u >= 0,   x_i y_i = 0,

which for a positive-definite ``G`` (it is regularised, as TorchJD does) have one solution, found in a
few iterations by block principal pivoting (Judice and Pires, 1994): guess which coordinates are free
(``x_i`` unknown, ``y_i = 0``), solve the free block, and swap every coordinate whose sign is wrong,
falling back to swapping one coordinate at a time (Murty's rule, which always terminates) when the
number of wrong signs stops falling. Each iteration is one batched Cholesky solve of the ``k``
programs' free blocks.

Example:
    >>> import torch
    >>> from torchjd.aggregation import UPGrad
    >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])  # two conflicting objectives
    >>> UPGrad(projector=PivotingProjector())(J)
    tensor([0.2929, 1.9004, 1.9004])
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchjd.linalg import DualConeProjector, QuadprogProjector

_BACKUP_ROUNDS = 3  # full exchanges allowed without progress before single swaps (Judice and Pires' p)
_RELATIVE_TOLERANCE = 1e-10


class PivotingProjector(DualConeProjector):
    """Solves :meth:`DualConeProjector.__call__`'s quadratic programs by batched block principal pivoting.

    Args:
        norm_eps: the Gramian is divided by its trace unless the trace is below ``norm_eps`` (then
            it is taken as zero), as TorchJD's projector does.
        reg_eps: added to the normalised Gramian's diagonal, so that it is positive definite.
        max_iterations: pivoting iterations before the programs still unsolved are handed to
            TorchJD's quadprog projector; ``None``: ``4 m + 20``. Pivoting needs a handful in
            practice.

    The result equals :class:`~torchjd.linalg.QuadprogProjector`'s with the same ``norm_eps`` and
    ``reg_eps`` up to solver round-off (``tests/test_jd_projector.py``).
    """

    def __init__(self, *, norm_eps: float = 1e-4, reg_eps: float = 1e-4, max_iterations: int | None = None) -> None:
        if norm_eps < 0 or reg_eps < 0:
            raise ValueError(f"norm_eps and reg_eps must be non-negative, got norm_eps={norm_eps}, reg_eps={reg_eps}")
        if max_iterations is not None and max_iterations < 1:
            raise ValueError(f"max_iterations must be positive, got {max_iterations}")
        self.norm_eps = norm_eps
        self.reg_eps = reg_eps
        self.max_iterations = max_iterations

    def __repr__(self) -> str:
        return f"{type(self).__name__}(norm_eps={self.norm_eps}, reg_eps={self.reg_eps}, max_iterations={self.max_iterations})"

    def __call__(self, U: Tensor, G: Tensor) -> Tensor:
        m = G.shape[0]
        gramian = _regularized(G.detach().to(torch.float64), self.norm_eps, self.reg_eps)
        lower = U.detach().reshape(-1, m).to(device=G.device, dtype=torch.float64)
        limit = self.max_iterations if self.max_iterations is not None else 4 * m + 20
        excess, solved = solve_lcp(gramian, lower @ gramian, limit)
        weights = lower + excess
        if not bool(solved.all()):
            weights[~solved] = self._fallback(lower[~solved], G)
        return weights.reshape(U.shape).to(G.dtype)

    def _fallback(self, lower: Tensor, G: Tensor) -> Tensor:
        return QuadprogProjector(norm_eps=self.norm_eps, reg_eps=self.reg_eps)(lower, G).to(torch.float64)


def _regularized(gramian: Tensor, norm_eps: float, reg_eps: float) -> Tensor:
    """``G / trace(G) + reg_eps I`` (``reg_eps I`` alone when the trace is below ``norm_eps``)."""
    trace = gramian.diagonal().sum()
    normalized = torch.where(trace < norm_eps, torch.zeros_like(gramian), gramian / trace)
    return normalized + reg_eps * torch.eye(gramian.shape[0], dtype=gramian.dtype, device=gramian.device)


def solve_lcp(matrix: Tensor, offsets: Tensor, max_iterations: int) -> tuple[Tensor, Tensor]:
    """Solve ``x >= 0, y = matrix x + q >= 0, x * y = 0`` for every row ``q`` of ``offsets``.

    Args:
        matrix: ``[m, m]``, symmetric positive definite.
        offsets: ``[k, m]``, one problem per row.
        max_iterations: pivoting iterations at most.

    Returns:
        ``x`` of shape ``[k, m]`` and a ``[k]`` mask of the problems solved within ``max_iterations``
        (the others' rows of ``x`` are not meaningful).
    """
    k, m = offsets.shape
    device = offsets.device
    x = torch.zeros_like(offsets)
    free = torch.zeros(k, m, dtype=torch.bool, device=device)  # start from x = 0, y = q
    best = torch.full((k,), m + 1, device=device)
    backup = torch.full((k,), _BACKUP_ROUNDS, device=device)
    positions = torch.arange(1, m + 1, device=device)
    for iteration in range(max_iterations + 1):
        y = (x @ matrix + offsets).masked_fill(free, 0.0)
        scale = _RELATIVE_TOLERANCE * (x.abs().amax(1, keepdim=True) + offsets.abs().amax(1, keepdim=True) + 1e-30)
        wrong = (free & (x < -scale)) | (~free & (y < -scale))
        count = wrong.sum(1)
        unsolved = count > 0
        if iteration == max_iterations or not bool(unsolved.any()):
            break
        progress = count < best
        single = unsolved & ~progress & (backup < 1)
        backup = torch.where(progress, _BACKUP_ROUNDS, torch.where(single, backup, backup - 1))
        best = torch.where(progress, count, best)
        last_wrong = torch.nn.functional.one_hot((wrong * positions).argmax(1), m).bool()
        free = free ^ (torch.where(single[:, None], last_wrong, wrong) & unsolved[:, None])
        rows = unsolved.nonzero().squeeze(1)  # only the problems still unsolved are solved again
        x[rows] = _solve_free_block(matrix, offsets[rows], free[rows])
    return x.clamp_min(0.0), ~unsolved


def _solve_free_block(matrix: Tensor, offsets: Tensor, free: Tensor) -> Tensor:
    """``x`` with ``x_F = -matrix_FF^{-1} q_F`` on each problem's free set ``F`` and ``0`` elsewhere."""
    both_free = free[:, :, None] & free[:, None, :]
    system = torch.where(both_free, matrix, 0.0) + torch.diag_embed((~free).to(matrix.dtype))
    rhs = -(offsets * free).unsqueeze(-1)
    factor, info = torch.linalg.cholesky_ex(system)
    if bool((info == 0).all()):
        return torch.cholesky_solve(rhs, factor).squeeze(-1)
    return torch.linalg.solve(system, rhs).squeeze(-1)  # round-off made a block indefinite
