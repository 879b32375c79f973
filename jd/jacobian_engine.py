"""``jd.engine=autojac`` and ``gramian`` on this rank's Jacobian (single process or ``jd.distributed=local``).

Also the fallback of ``jd.engine=per_sample`` for forwards run outside :meth:`jd.step.JDStep.forward_context`
(same result, slower).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchjd.aggregation import Aggregator

from jd.aggregators import aggregate, gramian_weighting
from jd.config import JDConfig
from jd.update import JDUpdate, all_finite, flatten_blocks, gd_rows, jacobian_blocks, unflatten


def local_update(objectives: Tensor, params: list[Tensor], rows: list[Tensor], *, aggregator: Aggregator, engine: str, config: JDConfig) -> JDUpdate:
    """Differentiate ``objectives`` w.r.t. ``params`` (and the puzzle ``rows`` when they take part) and
    aggregate: ``gramian`` / ``per_sample`` weight the rows of ``J`` by ``weighting(J J^T)`` (Gramian
    summed block by block, no concatenated ``J``), ``autojac`` gives the whole ``J`` to the aggregator.
    The gradients are scaled by ``m``."""
    m = objectives.shape[0]
    jac_rows = rows if config.include_puzzle_embedding else []
    if not all_finite(objectives):
        return JDUpdate(m)
    left_out = gd_rows(objectives, rows, config.include_puzzle_embedding)
    inputs = params + jac_rows
    blocks = jacobian_blocks(objectives, inputs, config.parallel_chunk_size) if inputs else []
    update = JDUpdate(m)
    if engine in ("gramian", "per_sample"):
        weighting = gramian_weighting(aggregator)
        assert weighting is not None
        gramian = sum((b.reshape(m, -1) @ b.reshape(m, -1).T for b in blocks), objectives.new_zeros(m, m).detach())
        if not all_finite(gramian):
            return JDUpdate(m)
        weights = weighting(gramian).to(gramian.dtype)
        grads = [m * torch.tensordot(weights, b, dims=1) for b in blocks]
        update.gramian, update.weights = gramian, weights
    else:
        jacobian = flatten_blocks(blocks, m, objectives.detach())
        vector, jacobian_weights = aggregate(aggregator, jacobian)
        grads = unflatten(m * vector, inputs)
        if config.diagnostics:
            update.gramian, update.weights = jacobian @ jacobian.T, jacobian_weights
            update.projections, update.update_sq_norm = jacobian @ vector, vector @ vector
    if not all_finite(*grads, *(left_out or [])):
        return JDUpdate(m)
    update.param_grads = grads[: len(params)]
    update.row_grads = left_out if left_out is not None else grads[len(params) :]
    return update
