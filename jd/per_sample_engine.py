"""``jd.engine=per_sample``: the Jacobian from per-sample gradients, for splits linear in per-sample losses.

The model runs with per-sample weight leaves (:mod:`models.per_sample`), so one backward per "channel"
(the per-sample loss, or its LM and halting parts when the split separates them, per supervision
step) yields the per-sample gradients ``E``. The Jacobian is ``J = A E`` with ``A`` read off the split
(:func:`mixing_matrix`), ``G = A (E E^T) A^T``, and the update ``m J^T w = m E^T (A^T w)`` needs no
second backward.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import Tensor, nn

from jd.aggregators import AggregatorCache, gramian_weighting
from jd.config import JDConfig
from jd.splits import SplitSpec, bucket_matrix
from jd.update import JDUpdate, all_finite
from models.loss_terms import LossTerms
from models.per_sample import PerSampleWeights

_Unit = tuple[int, Tensor, Tensor]
"""One backward: (supervision step, per-sample losses ``[B]``, their mixing columns ``[m, B]``)."""


def per_sample_update(
    steps: Sequence[LossTerms],
    params: list[Tensor],
    rows: list[Tensor],
    *,
    split: SplitSpec,
    weights: PerSampleWeights,
    config: JDConfig,
    generator: torch.Generator,
    aggregators: AggregatorCache,
    mixings: dict[tuple[int, ...], Tensor],
) -> JDUpdate:
    """The update of one micro-batch whose forwards ran with the per-sample ``weights`` of ``params``.

    ``generator`` buckets the objectives when ``jd.n_groups`` is set; ``aggregators.for_m(m)`` is asked
    once the Gramian is known finite; ``mixings`` keeps the split's mixing matrices from step to step."""
    batch = steps[0].batch_size
    channels = [value for terms in steps for value in (terms.lm.sum(dim=1), terms.halting())]  # [B] each, step-major
    objectives = split.objectives(steps)
    mixing = mixing_matrix(split, steps, channels, objectives, mixings)  # [m0, C * B]
    if config.n_groups is not None:
        buckets = bucket_matrix(objectives.shape[0], config.n_groups, generator).to(mixing)
        mixing, objectives = buckets @ mixing, buckets.to(objectives) @ objectives
    m = objectives.shape[0]
    if not all_finite(objectives):
        return JDUpdate(m)

    units = _channel_units(mixing, channels, len(steps), batch)
    step_rows = rows if len(rows) == len(steps) else []
    per_sample, row_grads = _unit_gradients(units, weights, [cast(nn.Parameter, p) for p in params], step_rows)
    coefficients = torch.cat([cols for _, _, cols in units], dim=1)  # A over the units' samples, [m, U * B]

    # Gramian of the per-sample gradients E [U * B, n], then of the objectives: G = A (E E^T) A^T.
    include_rows = config.include_puzzle_embedding and bool(row_grads)
    inner = _sample_gramian(per_sample, row_grads if include_rows else [], units, batch, objectives)
    coefficients = coefficients.float()
    gramian = coefficients @ inner @ coefficients.T
    if not all_finite(gramian):
        return JDUpdate(m)
    aggregator = aggregators.for_m(m)
    weighting = gramian_weighting(aggregator)
    assert weighting is not None
    objective_weights = weighting(gramian).to(gramian.dtype)
    if not all_finite(objective_weights):  # finite weights of a finite Gramian (every per-sample gradient's squares) give a finite update
        return JDUpdate(m)
    mix = m * (coefficients.T @ objective_weights)  # [U * B]: each per-sample gradient's coefficient in the update
    param_grads = [torch.tensordot(mix.to(slot[0].dtype), _stacked(slot), dims=1) for slot in per_sample]
    final_rows: list[Tensor] = []
    if step_rows:
        row_mix = mix if include_rows else (coefficients.T @ torch.ones_like(objective_weights))
        final_rows = _mixed_rows(step_rows, row_grads, units, row_mix, batch)
    elif rows:
        final_rows = [torch.zeros_like(r) for r in rows]
    return JDUpdate(m, param_grads=param_grads, row_grads=final_rows, gramian=gramian, weights=objective_weights)


def mixing_matrix(
    split: SplitSpec, steps: Sequence[LossTerms], channels: list[Tensor], objectives: Tensor, known: dict[tuple[int, ...], Tensor]
) -> Tensor:
    """``A`` with ``objectives = A @ cat(channels)``, read off the split on probe losses, and checked.

    The probe sees nothing but the losses' shapes, so ``A`` is kept in ``known`` by them and read off once;
    the check that it rebuilds this step's objectives runs every step."""
    batch, seq = steps[0].lm.shape
    device = objectives.device
    key = (len(steps), batch, seq, objectives.shape[0])
    if key in known:
        return _checked(known[key], split, channels, objectives)

    def probe(values: Tensor) -> Tensor:
        fake: list[LossTerms] = []
        for k in range(len(steps)):
            lm_part, halt_part = values[2 * k * batch : (2 * k + 1) * batch], values[(2 * k + 1) * batch : (2 * k + 2) * batch]
            lm = torch.cat([lm_part.unsqueeze(1), lm_part.new_zeros(batch, seq - 1)], dim=1)
            fake.append(LossTerms(lm=lm, q_halt=2 * halt_part))  # halting() = 0.5 * q_halt
        return split.objectives(fake)

    zeros = torch.zeros(len(channels) * batch, device=device)
    known[key] = torch.autograd.functional.jacobian(probe, zeros, vectorize=True)
    return _checked(known[key], split, channels, objectives)


def _checked(mixing: Tensor, split: SplitSpec, channels: list[Tensor], objectives: Tensor) -> Tensor:
    """``mixing``, once it rebuilds ``objectives`` from the channels (else the split is not linear in them)."""
    rebuilt = mixing @ torch.cat([c.detach().float() for c in channels])
    if not torch.allclose(rebuilt, objectives.detach().float(), rtol=1e-4, atol=1e-6 * max(1.0, float(objectives.detach().abs().max()))):
        raise ValueError(f"jd.engine=per_sample: jd.split={split.name} is not linear in per-sample losses")
    return mixing


def _channel_units(mixing: Tensor, channels: list[Tensor], num_steps: int, batch: int) -> list[_Unit]:
    """One backward per distinct channel: LM and halting merge when the split never separates them, and a
    channel no objective uses (the halting loss of the study's supervision stacks) costs none."""
    units: list[_Unit] = []
    for k in range(num_steps):
        lm_cols, halt_cols = mixing[:, 2 * k * batch : (2 * k + 1) * batch], mixing[:, (2 * k + 1) * batch : (2 * k + 2) * batch]
        if torch.equal(lm_cols, halt_cols):
            units.append((k, channels[2 * k] + channels[2 * k + 1], lm_cols))
        else:
            units.extend((k, channel, cols) for channel, cols in ((channels[2 * k], lm_cols), (channels[2 * k + 1], halt_cols)) if cols.any())
    return units


def _unit_gradients(
    units: list[_Unit], weights: PerSampleWeights, params: list[nn.Parameter], step_rows: list[Tensor]
) -> tuple[list[list[Tensor]], list[Tensor]]:
    """One backward per unit: per parameter, one ``[B, *shape]`` gradient per unit; per unit, ``[B, D]`` of its step's rows."""
    per_sample: list[list[Tensor]] = [[] for _ in params]
    row_grads: list[Tensor] = []
    leaves = [weights.by_parameter[p] for p in params]
    for index, (k, losses, _) in enumerate(units):
        targets = leaves + ([step_rows[k]] if step_rows else [])
        grads = torch.autograd.grad(losses.sum(), targets, retain_graph=index < len(units) - 1, allow_unused=True)
        for slot, grad in zip(per_sample, weights.gradients(params, grads[: len(leaves)])):
            slot.append(grad)
        if step_rows:
            row_grads.append(torch.zeros_like(step_rows[k]) if grads[-1] is None else grads[-1])
    return per_sample, row_grads


def _stacked(slot: list[Tensor]) -> Tensor:
    """One leaf's per-sample gradients of every unit as ``[U * B, *shape]``: the one unit's own tensor (no
    copy) when there is one, as for instance-wise splits."""
    return slot[0] if len(slot) == 1 else torch.cat(slot)


def _sample_gramian(per_sample: list[list[Tensor]], row_grads: list[Tensor], units: list[_Unit], batch: int, like: Tensor) -> Tensor:
    """``E E^T`` over the units' samples, in float32; ``row_grads`` (empty: rows left out) add their diagonal blocks."""
    inner = like.new_zeros(len(units) * batch, len(units) * batch).float()
    for slot in per_sample:
        flat = _stacked(slot).reshape(len(units) * batch, -1).float()
        inner += _gram(flat)
    if row_grads:
        for i, (k_i, _, _) in enumerate(units):
            for j, (k_j, _, _) in enumerate(units):
                if k_i == k_j:  # rows of different forwards are different columns of J
                    dots = (row_grads[i].float() * row_grads[j].float()).sum(dim=1)
                    inner[i * batch : (i + 1) * batch, j * batch : (j + 1) * batch] += torch.diag(dots)
    return inner


def _gram(rows: Tensor, chunks: int = 4) -> Tensor:
    """``rows @ rows.T`` for ``rows [N, K]`` with ``K >> N``: as ``chunks`` products over slices of ``K``, summed.

    One ``[N, K] @ [K, N]`` product spreads poorly over CPU threads (its output is tiny); the batched
    form measured 20-25% faster on two cores (``N = 32``, ``K = 4k-32k``) and gives the same sums up to round-off.
    """
    if rows.shape[1] % chunks or rows.shape[1] < 1024 * chunks:
        return rows @ rows.T
    sliced = rows.unflatten(1, (chunks, -1)).transpose(0, 1)  # [chunks, N, K / chunks]
    return torch.bmm(sliced, sliced.transpose(1, 2)).sum(0)


def _mixed_rows(step_rows: list[Tensor], row_grads: list[Tensor], units: list[_Unit], row_mix: Tensor, batch: int) -> list[Tensor]:
    """Each step's puzzle-row gradient: its units' per-sample row gradients weighted by ``row_mix``."""
    final_rows: list[Tensor] = []
    for k, row in enumerate(step_rows):
        total = torch.zeros_like(row)
        for i, (k_i, _, _) in enumerate(units):
            if k_i == k:
                total = total + row_mix[i * batch : (i + 1) * batch].to(row.dtype).unsqueeze(1) * row_grads[i]
        final_rows.append(total)
    return final_rows
