"""Exact aggregation of the global Jacobian over all ranks (shared splits, or ``jd.distributed=global``).

Global objectives: the ``shared`` leading ones (summed over ranks), then each rank's per-instance
ones in rank order. Columns: the parameters, then each rank's puzzle rows. Every rank gets the same
weights (computed from the same ``G``, broadcast from rank 0) and the same parameter gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from jd.aggregators import AggregatorCache, aggregate, gramian_weighting
from jd.collective import Collective
from jd.config import JDConfig
from jd.update import JDUpdate, all_finite, flatten_blocks, gd_rows, jacobian_blocks, unflatten


@dataclass(frozen=True)
class _Sizes:
    """What every rank told the others: the shared count, each rank's instance and puzzle-row counts, finiteness."""

    shared: int
    instance_counts: list[int]
    row_counts: list[int]
    finite: bool

    @property
    def m(self) -> int:
        return self.shared + sum(self.instance_counts)

    @property
    def offsets(self) -> list[int]:
        """Where each rank's per-instance objectives start in the global vector."""
        return [self.shared + sum(self.instance_counts[:r]) for r in range(len(self.instance_counts))]

    def local_index(self, rank: int, device: torch.device) -> Tensor:
        """This rank's objectives' positions in the global vector."""
        start = self.offsets[rank]
        return torch.cat([torch.arange(self.shared), torch.arange(start, start + self.instance_counts[rank])]).to(device)


def _agree_on_sizes(comm: Collective, objectives: Tensor, shared: int, row_numel: int, finite: bool, split_name: str) -> _Sizes:
    info = torch.tensor([shared, objectives.shape[0] - shared, row_numel, int(finite)], device=objectives.device)
    table = torch.cat(comm.all_gather_rows(info.unsqueeze(0), [1] * comm.world_size)).tolist()
    if len({r[0] for r in table}) != 1:
        raise RuntimeError(f"jd.split={split_name}: ranks disagree on the number of shared objectives: {[r[0] for r in table]}")
    return _Sizes(shared, [int(r[1]) for r in table], [int(r[2]) for r in table], all(r[3] for r in table))


def global_update(
    objectives: Tensor,
    shared: int,
    params: list[Tensor],
    rows: list[Tensor],
    *,
    engine: str,
    config: JDConfig,
    split_name: str,
    collective: Collective,
    aggregators: AggregatorCache,
) -> JDUpdate:
    """This rank's part of the update from the global Jacobian (see the module docstring).

    ``aggregators.for_m(m)`` is asked with the global ``m`` once every rank's objectives are known finite.
    """
    comm = collective
    jac_rows = rows if config.include_puzzle_embedding else []
    finite = all_finite(objectives)
    left_out = gd_rows(objectives, rows, config.include_puzzle_embedding) if finite else None
    finite = finite and all_finite(*(left_out or []))
    sizes = _agree_on_sizes(comm, objectives, shared, sum(r.numel() for r in jac_rows), finite, split_name)
    update = JDUpdate(sizes.m)
    if not sizes.finite:
        return update
    aggregator = aggregators.for_m(sizes.m)
    global_params, row_matrix = _gathered_params(comm, objectives, params, jac_rows, sizes, config.parallel_chunk_size)
    weighting = gramian_weighting(aggregator) if engine == "gramian" else None
    if weighting is not None:
        vectors = _by_gramian(comm, weighting, global_params, row_matrix, sizes, update)
    else:
        vectors = _by_jacobian(comm, aggregator, global_params, row_matrix, sizes, update, config.diagnostics)
    if vectors is None:
        return update
    param_grads = unflatten(sizes.m * vectors[0], params)
    row_grads = unflatten(sizes.m * vectors[1], jac_rows)
    finite_grads = torch.tensor([int(all_finite(*param_grads, *row_grads))], device=objectives.device)
    if not bool(comm.all_reduce(finite_grads, op=dist.ReduceOp.MIN).item()):  # every rank skips, or none
        return JDUpdate(sizes.m)
    update.param_grads = param_grads
    update.row_grads = left_out if left_out is not None else row_grads
    return update


def _gathered_params(
    comm: Collective, objectives: Tensor, params: list[Tensor], jac_rows: list[Tensor], sizes: _Sizes, chunk_size: int | None
) -> tuple[Tensor, Tensor]:
    """The global parameter Jacobian ``[m, n]`` (identical on every rank) and this rank's puzzle-row block."""
    local_m = objectives.shape[0]
    blocks = jacobian_blocks(objectives, params + jac_rows, chunk_size)
    param_matrix = flatten_blocks(blocks[: len(params)], local_m, objectives.detach())
    row_matrix = flatten_blocks(blocks[len(params) :], local_m, objectives.detach())
    del blocks
    shared_part = param_matrix[: sizes.shared].contiguous()
    if sizes.shared > 0:
        comm.all_reduce(shared_part)
    instance_parts = comm.all_gather_rows(param_matrix[sizes.shared :].contiguous(), sizes.instance_counts)
    return torch.cat([shared_part, *instance_parts]), row_matrix


def _by_gramian(
    comm: Collective, weighting: Any, global_params: Tensor, row_matrix: Tensor, sizes: _Sizes, update: JDUpdate
) -> tuple[Tensor, Tensor] | None:
    """Weights from the global Gramian (rank 0's, broadcast); the update vectors of the parameters and this rank's rows."""
    m, local_index = sizes.m, sizes.local_index(comm.rank, global_params.device)
    gramian = global_params @ global_params.T
    row_gramian = gramian.new_zeros(m, m)
    row_gramian[local_index.unsqueeze(1), local_index.unsqueeze(0)] = row_matrix @ row_matrix.T
    gramian = gramian + comm.all_reduce(row_gramian)
    if not all_finite(gramian):
        return None
    weights = comm.broadcast_from_first(weighting(gramian).to(gramian.dtype).contiguous())
    update.gramian, update.weights = gramian, weights
    return global_params.T @ weights, row_matrix.T @ weights[local_index]


def _by_jacobian(
    comm: Collective, aggregator: Any, global_params: Tensor, row_matrix: Tensor, sizes: _Sizes, update: JDUpdate, diagnostics: bool
) -> tuple[Tensor, Tensor]:
    """The aggregator on the whole global Jacobian (rank 0's result, broadcast); the parameters' and this rank's rows' part."""
    rank = comm.rank
    jacobian, row_offsets = _global_jacobian(comm, global_params, row_matrix, sizes.shared, sizes.offsets, sizes.instance_counts, sizes.row_counts)
    vector, weights = aggregate(aggregator, jacobian)
    vector = comm.broadcast_from_first(vector.contiguous())
    if weights is not None:
        weights = comm.broadcast_from_first(weights.to(vector.dtype).contiguous())
    n = global_params.shape[1]
    if diagnostics:
        update.gramian, update.weights = jacobian @ jacobian.T, weights
        update.projections, update.update_sq_norm = jacobian @ vector, vector @ vector
    return vector[:n], vector[n + row_offsets[rank] : n + row_offsets[rank] + sizes.row_counts[rank]]


def _global_jacobian(
    comm: Collective,
    global_params: Tensor,
    row_matrix: Tensor,
    shared: int,
    offsets: list[int],
    instance_counts: list[int],
    row_counts: list[int],
) -> tuple[Tensor, list[int]]:
    """The full global Jacobian ``[m, n + sum_r k_r]`` (for aggregators that need it), and each rank's row-column offset."""
    widest = shared + max(instance_counts)
    local_rows = row_matrix.new_zeros(row_matrix.shape[1], widest)  # [k_r, m_r] padded: gather along k_r
    local_rows[:, : row_matrix.shape[0]] = row_matrix.T
    gathered = comm.all_gather_rows(local_rows, row_counts)
    m, n = global_params.shape
    row_offsets = [sum(row_counts[:r]) for r in range(comm.world_size)]
    jacobian = global_params.new_zeros(m, n + sum(row_counts))
    jacobian[:, :n] = global_params
    for r, block in enumerate(gathered):
        if row_counts[r] == 0:
            continue
        index = torch.cat([torch.arange(shared), torch.arange(offsets[r], offsets[r] + instance_counts[r])]).to(jacobian.device)
        columns = slice(n + row_offsets[r], n + row_offsets[r] + row_counts[r])
        jacobian[index, columns] = block[:, : shared + instance_counts[r]].T
    return jacobian, row_offsets
