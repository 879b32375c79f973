"""How far a Jacobian-descent update departs from gradient descent, from the Gramian alone.

Every quantity comes from the Gramian ``G = J J^T`` (``[m, m]``, the inner products of the
objectives' gradients) and the update, never from a second backward pass. With weights ``w`` the
aggregator's update is ``d = J^T w``, so ``J d = G w`` and ``||d||^2 = w^T G w``; for aggregators that
give no weights the step passes ``J d`` and ``||d||^2`` directly.

Metrics (all floats):

``J^T 1`` is the gradient of the objectives' sum: the GD gradient for every split that partitions
the GD loss (all but the internal-cycle stacks, see :mod:`jd.splits`).

* ``jd/gd_similarity``: ``cos(d, J^T 1) = 1^T J d / (||d|| ||J^T 1||)``, i.e.
  ``w^T G 1 / (sqrt(w^T G w) sqrt(1^T G 1))``; 1 for the ``mean`` aggregator, 0 when either vector is zero.
* ``jd/update_norm_ratio``: ``m ||d|| / ||J^T 1||``: the norm of the applied update (the step
  multiplies ``d`` by ``m``, see :mod:`jd.splits`) relative to the GD gradient; equivalently
  ``||d|| / ||J^T 1 / m||``, the aggregate relative to the mean gradient. 1 for ``mean``.
* ``jd/update_alignment_min``: ``min_i cos(d, g_i)`` over objectives with a non-zero gradient
  ``g_i``; non-negative when the update conflicts with no objective: UPGrad's and DualProj's guarantee
  with this project's default exact projector (TorchJD's regularised one, ``reg_eps=1e-4``, does not
  guarantee it for objectives with a small share of the Gramian's trace).
* ``jd/num_objectives``: ``m``.
* ``jd/gramian_min``, ``jd/gramian_mean``, ``jd/gramian_median``: statistics of all entries of ``G``;
  ``jd/gramian_diag_min``, ``jd/gramian_diag_mean``: of its diagonal (squared gradient norms).
* ``jd/conflict_fraction``: the share of objective pairs ``i < j`` whose gradients conflict (``G_ij < 0``).
* ``jd/weights_min``, ``jd/weights_max``, ``jd/weights_entropy``: of the weights, the entropy (nats)
  of ``|w| / sum |w|``; present only when the aggregator has weights.

Cost: ``O(m^2)`` on the device plus one host transfer of a dozen numbers.
"""

from __future__ import annotations

import torch
from torch import Tensor


def diagnostics_from_weights(gramian: Tensor, weights: Tensor) -> dict[str, float]:
    """Diagnostics of the update ``J^T w`` from ``G = J J^T`` and ``w``."""
    g = gramian.detach().double()
    w = weights.detach().double().to(g.device)
    projections = g @ w
    return _metrics(g, projections, w @ projections, w)


def diagnostics_from_update(gramian: Tensor, projections: Tensor, update_sq_norm: Tensor, weights: Tensor | None = None) -> dict[str, float]:
    """Diagnostics of an update ``d`` given ``G = J J^T``, ``projections = J d`` and ``||d||^2``."""
    g = gramian.detach().double()
    w = None if weights is None else weights.detach().double().to(g.device)
    return _metrics(g, projections.detach().double().to(g.device), update_sq_norm.detach().double().to(g.device), w)


def _metrics(gramian: Tensor, projections: Tensor, update_sq_norm: Tensor, weights: Tensor | None) -> dict[str, float]:
    m = gramian.shape[0]
    gd_sq_norm = gramian.sum().clamp_min(0.0)  # 1^T G 1 = ||J^T 1||^2
    update_norm = update_sq_norm.clamp_min(0.0).sqrt()
    gd_norm = gd_sq_norm.sqrt()
    denominator = update_norm * gd_norm
    zero = gramian.new_zeros(())
    similarity = torch.where(denominator > 0, projections.sum() / denominator.clamp_min(1e-300), zero)
    norm_ratio = torch.where(gd_norm > 0, m * update_norm / gd_norm.clamp_min(1e-300), zero)

    diagonal = gramian.diagonal()
    gradient_norms = diagonal.clamp_min(0.0).sqrt()
    alive = gradient_norms > 0
    cosines = projections / (gradient_norms * update_norm).clamp_min(1e-300)
    alignment = torch.where(alive & (update_norm > 0), cosines, torch.full_like(cosines, float("inf"))).min()
    alignment = torch.where(torch.isinf(alignment), zero, alignment)

    if m > 1:
        upper = torch.triu_indices(m, m, offset=1, device=gramian.device)
        conflict = (gramian[upper[0], upper[1]] < 0).double().mean()
    else:
        conflict = zero

    entries = gramian.flatten()
    values = {
        "jd/gd_similarity": similarity,
        "jd/update_norm_ratio": norm_ratio,
        "jd/update_alignment_min": alignment,
        "jd/gramian_min": entries.min(),
        "jd/gramian_mean": entries.mean(),
        "jd/gramian_median": entries.median(),
        "jd/gramian_diag_min": diagonal.min(),
        "jd/gramian_diag_mean": diagonal.mean(),
        "jd/conflict_fraction": conflict,
    }
    if weights is not None:
        magnitudes = weights.abs()
        total = magnitudes.sum()
        p = magnitudes / total.clamp_min(1e-300)
        entropy = -(torch.where(p > 0, p * p.clamp_min(1e-300).log(), zero)).sum()
        values["jd/weights_min"] = weights.min()
        values["jd/weights_max"] = weights.max()
        values["jd/weights_entropy"] = torch.where(total > 0, entropy, zero)
    names = list(values)
    numbers = torch.stack([values[k].reshape(()) for k in names]).tolist()
    result = dict(zip(names, (float(x) for x in numbers)))
    result["jd/num_objectives"] = float(m)
    return result


def reduce_step_diagnostics(records: list[dict[str, float]], world_size: int = 1, device: torch.device | None = None) -> dict[str, float]:
    """The diagnostics of one optimizer step from those of its micro-batches on every rank.

    Each micro-batch (and, with ``jd.distributed=local``, each rank) aggregates its own Jacobian, so a
    step has several updates: the ``*_min`` metrics take the minimum over them, ``*_max`` the maximum,
    ``jd/skipped_nonfinite`` (a running count) the largest, and the others the mean. A collective
    when ``world_size > 1`` (every rank must call it, with the same keys).

    Example:
        >>> reduce_step_diagnostics([{"jd/gd_similarity": 0.5, "jd/update_alignment_min": -0.1},
        ...                          {"jd/gd_similarity": 1.0, "jd/update_alignment_min": 0.2}])
        {'jd/gd_similarity': 0.75, 'jd/update_alignment_min': -0.1}
    """
    records = [r for r in records if r]
    if not records:
        return {}
    keys = sorted(set().union(*records))
    kinds = {key: "min" if key.endswith("_min") else "max" if key.endswith("_max") or key == "jd/skipped_nonfinite" else "mean" for key in keys}
    values = torch.tensor([[r.get(k, float("nan")) for k in keys] for r in records], dtype=torch.float64)
    present = ~values.isnan()
    means = values.nan_to_num(0.0).sum(0) / present.sum(0).clamp_min(1)
    lows = values.nan_to_num(float("inf")).amin(0)
    highs = values.nan_to_num(float("-inf")).amax(0)
    if world_size > 1:
        import torch.distributed as dist

        packed = torch.stack([means, lows, -highs]).to(device or torch.device("cpu"))
        sums = packed[0].clone()
        dist.all_reduce(sums)
        extremes = packed[1:].clone()
        dist.all_reduce(extremes, op=dist.ReduceOp.MIN)
        means, lows, highs = (sums / world_size).cpu(), extremes[0].cpu(), -extremes[1].cpu()
    chosen = {"mean": means, "min": lows, "max": highs}
    return {key: float(chosen[kinds[key]][index]) for index, key in enumerate(keys)}
