"""Exact aggregation of the global Jacobian over all ranks (shared splits, or ``jd.distributed=global``).

Global objectives: the ``shared`` leading ones (summed over ranks), then each rank's per-instance
ones in rank order. Columns: the parameters, then each rank's puzzle rows. Every rank gets the same
weights (computed from the same ``G``, broadcast from rank 0) and the same parameter gradient.
"""

from __future__ import annotations



import torch
import torch.distributed as dist
from torch import Tensor


from jd.aggregators import AggregatorCache, aggregate, gramian_weighting
from jd.collective import Collective
from jd.config import JDConfig
from jd.update import JDUpdate, all_finite, flatten_blocks, gd_rows, jacobian_blocks, unflatten


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
    world_size = comm.world_size
    jac_rows = rows if config.include_puzzle_embedding else []
    local_m = objectives.shape[0]
    row_numel = sum(r.numel() for r in jac_rows)
    device = objectives.device
    finite = all_finite(objectives)
    left_out = gd_rows(objectives, rows, config.include_puzzle_embedding) if finite else None
    finite = finite and all_finite(*(left_out or []))
    info = torch.tensor([shared, local_m - shared, row_numel, int(finite)], device=device)
    infos = comm.all_gather_rows(info.unsqueeze(0), [1] * world_size)
    table = torch.cat(infos).tolist()
    if len({r[0] for r in table}) != 1:
        raise RuntimeError(f"jd.split={split_name}: ranks disagree on the number of shared objectives: {[r[0] for r in table]}")
    instance_counts = [int(r[1]) for r in table]
    row_counts = [int(r[2]) for r in table]
    m = shared + sum(instance_counts)
    if not all(r[3] for r in table):
        return JDUpdate(m)

    rank = comm.rank
    offsets = [shared + sum(instance_counts[:r]) for r in range(world_size)]
    local_index = torch.cat([torch.arange(shared), torch.arange(offsets[rank], offsets[rank] + instance_counts[rank])]).to(device)

    aggregator = aggregators.for_m(m)
    inputs = params + jac_rows
    blocks = jacobian_blocks(objectives, inputs, config.parallel_chunk_size)
    param_matrix = flatten_blocks(blocks[: len(params)], local_m, objectives.detach())
    row_matrix = flatten_blocks(blocks[len(params) :], local_m, objectives.detach())
    del blocks
    shared_part = param_matrix[:shared].contiguous()
    if shared > 0:
        comm.all_reduce(shared_part)
    instance_parts = comm.all_gather_rows(param_matrix[shared:].contiguous(), instance_counts)
    global_params = torch.cat([shared_part, *instance_parts])  # [m, n], identical on every rank
    del param_matrix, shared_part, instance_parts

    update = JDUpdate(m)
    weighting = gramian_weighting(aggregator) if engine == "gramian" else None
    if weighting is not None:
        gramian = global_params @ global_params.T
        row_gramian = gramian.new_zeros(m, m)
        row_gramian[local_index.unsqueeze(1), local_index.unsqueeze(0)] = row_matrix @ row_matrix.T
        gramian = gramian + comm.all_reduce(row_gramian)
        if not all_finite(gramian):
            return update
        weights = comm.broadcast_from_first(weighting(gramian).to(gramian.dtype).contiguous())
        param_vector = global_params.T @ weights
        row_vector = row_matrix.T @ weights[local_index]
        update.gramian, update.weights = gramian, weights
    else:
        jacobian, row_offsets = _global_jacobian(comm, global_params, row_matrix, shared, offsets, instance_counts, row_counts)
        vector, weights = aggregate(aggregator, jacobian)
        vector = comm.broadcast_from_first(vector.contiguous())
        if weights is not None:
            weights = comm.broadcast_from_first(weights.to(vector.dtype).contiguous())
        n = global_params.shape[1]
        param_vector = vector[:n]
        row_vector = vector[n + row_offsets[rank] : n + row_offsets[rank] + row_counts[rank]]
        if config.diagnostics:
            update.gramian, update.weights = jacobian @ jacobian.T, weights
            update.projections, update.update_sq_norm = jacobian @ vector, vector @ vector
    param_grads = unflatten(m * param_vector, params)
    row_grads = unflatten(m * row_vector, jac_rows)
    finite_grads = torch.tensor([int(all_finite(*param_grads, *row_grads))], device=device)
    if not bool(comm.all_reduce(finite_grads, op=dist.ReduceOp.MIN).item()):  # every rank skips, or none
        return JDUpdate(m)
    update.param_grads = param_grads
    update.row_grads = left_out if left_out is not None else row_grads
    return update


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
