"""One backward step: gradient descent or Jacobian descent, with the distributed rules.

The trainer calls :meth:`JDStep.backward` once per micro-batch and :meth:`JDStep.finish` once per
optimizer step; nothing else in the trainer knows which engine ran.

* ``jd.split=none``: ``loss.backward()`` on the GD loss and nothing else (no JD machinery, no
  host synchronisation); ``finish`` all-reduces the gradients once, as the reference code does.
* Any other split: the objectives ``[m]`` of the split (bucketed when ``jd.n_groups`` is set) are
  differentiated, the Jacobian is aggregated, and the result **multiplied by m** is accumulated
  into ``.grad``: with the ``mean`` aggregator this is exactly the GD gradient of the objectives'
  sum (the GD loss for the splits that partition it).

Engines (``jd.engine``; ``auto`` picks ``per_sample`` for the per-instance splits where it applies,
else ``gramian`` for a Gramian-weighted aggregator, else ``autojac``):

* ``per_sample``: for splits whose objectives are linear combinations of per-sample losses
  (:data:`PER_SAMPLE_SPLITS`: IWRM, ``lm_loss_vs_q_halt_loss``, the supervision stacks except the
  pixelwise ones) and Gramian-weighted aggregators. The model runs with per-sample weight leaves
  (:meth:`JDStep.forward_context`, :mod:`models.per_sample`), so ONE backward per "channel" (the
  per-sample loss, or its LM and halting parts when the split separates them, per supervision step)
  yields the per-sample gradients ``E``: the Jacobian is ``J = A E`` with ``A`` read off the split,
  ``G = A (E E^T) A^T``, and the update ``m J^T w = m E^T (A^T w)`` needs no second backward. IWRM
  costs about one GD backward instead of ``B``. Single process or ``jd.distributed=local``. Forwards
  run outside :meth:`JDStep.forward_context` fall back to the ``gramian`` path (same result).
* ``autojac``: the Jacobian ``J`` (``torchjd.autojac.jac``) is given to the aggregator, as
  ``autojac.backward`` + ``jac_to_grad`` would.
* ``gramian``: ``G = J J^T`` summed block by block (no concatenated ``J``), weights
  ``w = weighting(G)``, and the rows of ``J`` combined with ``w`` (no second backward).
* ``autogram``: ``G`` from ``torchjd.autogram.Engine`` without materialising ``J`` (call
  :meth:`JDStep.attach` with the model before its forward), then one backward of ``m w^T objectives``.
  The puzzle-row part of ``G`` comes from their (small) Jacobian. Single process or ``local`` mode
  only, and only for models that use each module once per backward: TorchJD 0.18's engine (with
  ``batch_dim=None``, needed for objectives that are not per-sample) miscounts re-used modules, so
  the step refuses weight-tied recursion such as the TRM's with a clear error.

Puzzle-embedding rows (``jd.include_puzzle_embedding``): by default the batch's rows take part in
the Jacobian like any parameter (for IWRM their columns are block-diagonal: a sample's row only
moves its own objectives). With ``false`` they are left out of the Gramian and the aggregation and
receive the plain GD gradient of the objectives' sum.

Gradient accumulation: each micro-batch is aggregated on its own and the aggregated (m-scaled)
gradients are summed in ``.grad``; ``m`` is that micro-batch's number of objectives.

Distributed (``world_size > 1``):

* Shared objectives (``lm_loss_vs_q_halt_loss``, pixelwise, internal and supervision stacks): the
  global objective is the sum over ranks, so its parameter Jacobian is the all-reduced local one;
  each rank's puzzle rows are its own columns, so ``G = P P^T + sum_r R_r R_r^T``. Every rank gets
  the same weights (computed from the same ``G``, broadcast from rank 0) and the same parameter
  gradient; ``finish`` has nothing left to reduce.
* Per-instance objectives (IWRM and its hybrids, ``pixelwise_q_halt_out``): ``jd.distributed=local``
  aggregates each rank's own Jacobian (``m`` = the local count) and ``finish`` SUMS the results
  across ranks (what the study did); ``global`` gathers the per-instance Jacobians of every rank
  and aggregates the exact global Jacobian (``m`` = the global count) like the shared case: exact,
  but it moves ``m x n`` numbers per rank.

Non-finite objectives, Gramian or update: the micro-batch adds nothing to ``.grad``, the step
counts it (:attr:`JDStep.skipped_nonfinite`, metric ``jd/skipped_nonfinite``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torchjd.aggregation import Aggregator
from torchjd.autogram import Engine
from torchjd.autojac import jac

from jd.aggregators import (
    aggregate,
    build_aggregator,
    expected_num_objectives,
    gramian_weighting,
    needs_num_objectives,
    validate_aggregator,
)
from jd.config import JDConfig
from jd.diagnostics import diagnostics_from_update, diagnostics_from_weights
from jd.splits import SplitSpec, bucket_matrix, group_objectives, split_from_config
from models.loss_terms import LossTerms
from models.per_sample import per_sample_parameters

PER_SAMPLE_SPLITS = frozenset(
    {
        "iwrm_with_q_halt_in",
        "iwrm_with_q_halt_out",
        "lm_loss_vs_q_halt_loss",
        "stack_supervisions",
        "stack_supervisions_and_sum",
        "stack_supervisions_and_iwrm",
    }
)
"""Splits whose objectives are linear in each sample's LM and halting losses (``jd.engine=per_sample``)."""


@dataclass
class _Update:
    """What one micro-batch contributes, before accumulation (``None`` grads: skipped)."""

    num_objectives: int
    param_grads: list[Tensor] | None = None
    row_grads: list[Tensor] | None = None
    gramian: Tensor | None = None
    weights: Tensor | None = None
    projections: Tensor | None = None  # J d
    update_sq_norm: Tensor | None = None  # ||d||^2


def _flat(blocks: Sequence[Tensor], m: int, like: Tensor) -> Tensor:
    """Concatenate Jacobian blocks ``[m, *shape]`` into one ``[m, n]`` matrix (``[m, 0]`` when empty)."""
    if not blocks:
        return like.new_zeros(m, 0)
    return torch.cat([b.reshape(m, -1) for b in blocks], dim=1)


def _unflatten(vector: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Split a flat vector into tensors shaped (and typed) like ``like``."""
    pieces = vector.split([t.numel() for t in like]) if like else []
    return [p.reshape(t.shape).to(t.dtype) for p, t in zip(pieces, like)]


def _grads_of(output: Tensor, inputs: Sequence[Tensor], grad_output: Tensor | None = None, retain_graph: bool = False) -> list[Tensor]:
    """``d output / d inputs`` (zeros for inputs the output does not depend on)."""
    if not inputs:
        return []
    grads = torch.autograd.grad(output, list(inputs), grad_outputs=grad_output, retain_graph=retain_graph, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs)]


def _all_finite(*tensors: Tensor | None) -> bool:
    """Whether every entry of every tensor is finite (one host synchronisation)."""
    checks = [torch.isfinite(t).all() for t in tensors if t is not None]
    return bool(torch.stack(checks).all()) if checks else True


class _Collective:
    """The few collectives the step needs, on ``group`` (all ranks when ``None``)."""

    def __init__(self, world_size: int, group: Any) -> None:
        self.world_size = world_size
        self.group = group

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    def all_reduce(self, tensor: Tensor, op: Any = dist.ReduceOp.SUM) -> Tensor:
        dist.all_reduce(tensor, op=op, group=self.group)
        return tensor

    def broadcast_from_first(self, tensor: Tensor) -> Tensor:
        source = 0 if self.group is None else dist.get_global_rank(self.group, 0)
        dist.broadcast(tensor, src=source, group=self.group)
        return tensor

    def all_gather_rows(self, tensor: Tensor, counts: Sequence[int]) -> list[Tensor]:
        """All-gather ``[count_r, *rest]`` tensors whose first dimension differs by rank."""
        longest = max(counts)
        if longest == 0:
            return [tensor.new_zeros((0, *tensor.shape[1:])) for _ in counts]
        padded = tensor.new_zeros((longest, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        gathered = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(gathered, padded.contiguous(), group=self.group)
        return [g[:c] for g, c in zip(gathered, counts)]


class JDStep:
    """Fills ``.grad`` of the parameters and puzzle-embedding rows from the losses of a micro-batch.

    Build it with :func:`build_jd_step`. See the module docstring for the engines, the
    ``m``-scaling, puzzle rows, gradient accumulation and the distributed semantics.
    """

    def __init__(self, config: JDConfig, split: SplitSpec, *, world_size: int = 1, group: Any = None) -> None:
        self.config = config
        self.split = split
        self.world_size = world_size
        self._collective = _Collective(world_size, group)
        self._generator = torch.Generator().manual_seed(config.seed)
        self._skipped = 0
        self._needs_finish_reduce = False
        self._autogram: Engine | None = None
        self._leaves: dict[nn.Parameter, Tensor] | None = None
        self._forward_counts: _ForwardCounter | None = None
        self._aggregator: Aggregator | None = None
        self._aggregator_m: int | None = None
        self.engine = "gd"
        if split.is_gd:
            return
        validate_aggregator(config.aggregator, config.aggregator_kwargs)
        probe = build_aggregator(config.aggregator, config.aggregator_kwargs, num_objectives=2)
        gramian_capable = gramian_weighting(probe) is not None
        per_sample_ok = split.name in PER_SAMPLE_SPLITS and gramian_capable and not self.exact_global
        if config.engine == "auto":  # per-sample gradients pay off where the objectives are per instance
            self.engine = "per_sample" if per_sample_ok and split.per_instance else "gramian" if gramian_capable else "autojac"
        else:
            self.engine = config.engine
        if self.engine == "per_sample" and not per_sample_ok:
            raise ValueError(
                f"jd.engine=per_sample needs a split among {sorted(PER_SAMPLE_SPLITS)}, a Gramian-weighted aggregator "
                f"and a single process or jd.distributed=local (got jd.split={split.name}, jd.aggregator={config.aggregator}); "
                "use jd.engine=auto"
            )
        if self.engine in ("gramian", "autogram") and not gramian_capable:
            raise ValueError(
                f"jd.engine={self.engine} needs weights computed from the Gramian, but jd.aggregator={config.aggregator} "
                "aggregates the Jacobian itself; use jd.engine=autojac (or auto)"
            )
        if self.engine == "autogram" and self.exact_global:
            raise ValueError(
                f"jd.engine=autogram computes only this rank's Gramian, but jd.split={split.name} with {world_size} ranks "
                "needs the global one; use jd.engine=gramian (or auto), or jd.distributed=local for a per-instance split"
            )
        if not needs_num_objectives(config.aggregator, config.aggregator_kwargs):
            self._aggregator = probe  # never used yet, so a stateful aggregator starts fresh

    # ------------------------------------------------------------------------------ properties
    @property
    def skipped_nonfinite(self) -> int:
        """Micro-batches skipped because their objectives, Gramian or update were not finite."""
        return self._skipped

    @property
    def exact_global(self) -> bool:
        """Several ranks aggregate one global Jacobian (shared splits, or ``jd.distributed=global``)."""
        return self.world_size > 1 and (not self.split.per_instance or self.config.distributed == "global")

    def forward_context(self, model: nn.Module, batch_size: int) -> contextlib.AbstractContextManager[Any]:
        """Wrap the forwards (and the :meth:`backward`) of one micro-batch: with ``jd.engine=per_sample``
        the model computes with per-sample weight leaves; a no-op for every other engine."""
        if self.engine != "per_sample":
            return contextlib.nullcontext()
        return self._per_sample_scope(model, batch_size)

    @contextlib.contextmanager
    def _per_sample_scope(self, model: nn.Module, batch_size: int) -> Iterator[None]:
        with per_sample_parameters(model, batch_size) as leaves:
            self._leaves = leaves
            try:
                yield
            finally:
                self._leaves = None

    def attach(self, *modules: nn.Module) -> None:
        """Hook the model's modules for ``jd.engine=autogram`` (before their forward); a no-op for other engines.

        Every forward of these modules under gradient must then feed the objectives (TorchJD's
        autogram engine refuses a forward without a backward)."""
        if self.engine == "autogram":
            self._autogram = Engine(*modules, batch_dim=None)
            self._forward_counts = _ForwardCounter(modules)

    # --------------------------------------------------------------------------------- backward
    def backward(self, steps: Sequence[LossTerms], params: Sequence[Tensor], puzzle_rows: Sequence[Tensor]) -> dict[str, float]:
        """Accumulate one micro-batch's gradient into ``.grad`` of ``params`` and ``puzzle_rows``.

        ``steps`` holds one :class:`LossTerms` per supervision step (one unless the split is a
        supervision stack). Returns ``jd/...`` metrics (empty for ``jd.split=none``).
        """
        if self.split.is_gd:
            total = steps[0].total()
            for terms in steps[1:]:
                total = total + terms.total()
            total.backward()
            self._needs_finish_reduce = True
            return {}

        if self.engine == "per_sample" and self._leaves is not None:
            update = self._per_sample_update(steps, [p for p in params if p.requires_grad], [r for r in puzzle_rows if r.requires_grad])
            self._needs_finish_reduce = self.world_size > 1
            return self._apply(update, [p for p in params if p.requires_grad], [r for r in puzzle_rows if r.requires_grad])

        objectives = self.split.objectives(steps)
        shared = self.split.shared_count(steps)
        if self.config.n_groups is not None:
            fully_shared = shared == objectives.shape[0]
            objectives = group_objectives(objectives, self.config.n_groups, self._generator)
            shared = objectives.shape[0] if fully_shared else 0
        params = [p for p in params if p.requires_grad]
        rows = [r for r in puzzle_rows if r.requires_grad]

        if self.exact_global:
            update = self._global_update(objectives, shared, params, rows)
        else:
            update = self._local_update(objectives, params, rows)
            self._needs_finish_reduce = self.world_size > 1

        return self._apply(update, params, rows)

    def _apply(self, update: _Update, params: list[Tensor], rows: list[Tensor]) -> dict[str, float]:
        """Accumulate an update into ``.grad`` (or count it as skipped) and return its metrics."""
        if update.param_grads is None:
            self._skipped += 1
            return {"jd/skipped_nonfinite": float(self._skipped), "jd/num_objectives": float(update.num_objectives)}
        for tensor, grad in zip(params, update.param_grads):
            _accumulate(tensor, grad)
        for tensor, grad in zip(rows, update.row_grads or []):
            _accumulate(tensor, grad)
        metrics = self._diagnostics(update)
        metrics["jd/skipped_nonfinite"] = float(self._skipped)
        metrics["jd/num_objectives"] = float(update.num_objectives)
        return metrics

    def _diagnostics(self, update: _Update) -> dict[str, float]:
        if not self.config.diagnostics or update.gramian is None:
            return {}
        if update.projections is not None and update.update_sq_norm is not None:
            return diagnostics_from_update(update.gramian, update.projections, update.update_sq_norm, update.weights)
        assert update.weights is not None
        return diagnostics_from_weights(update.gramian, update.weights)

    def _aggregator_for(self, m: int) -> Aggregator:
        expected = expected_num_objectives(self.config.aggregator, self.config.aggregator_kwargs)
        if expected is not None and expected != m:
            raise ValueError(
                f"jd.aggregator_kwargs of {self.config.aggregator} are sized for {expected} objectives, "
                f"but jd.split={self.split.name} gives m={m} here"
            )
        if self._aggregator is None or (self._aggregator_m is not None and self._aggregator_m != m):
            self._aggregator = build_aggregator(self.config.aggregator, self.config.aggregator_kwargs, num_objectives=m)
            self._aggregator_m = m
        return self._aggregator

    def _gd_rows(self, objectives: Tensor, rows: Sequence[Tensor]) -> list[Tensor] | None:
        """Rows left out of the Jacobian (``include_puzzle_embedding=false``): GD gradient of the sum."""
        if self.config.include_puzzle_embedding or not rows:
            return None
        return _grads_of(objectives.sum(), rows, retain_graph=True)

    # ------------------------------------------------------------------- single process / local
    def _local_update(self, objectives: Tensor, params: list[Tensor], rows: list[Tensor]) -> _Update:
        m = objectives.shape[0]
        aggregator = self._aggregator_for(m)
        jac_rows = rows if self.config.include_puzzle_embedding else []
        if self.engine == "autogram":
            return self._autogram_update(objectives, aggregator, params, rows, jac_rows)
        if not _all_finite(objectives):
            return _Update(m)
        gd_rows = self._gd_rows(objectives, rows)
        inputs = params + jac_rows
        blocks = list(jac(objectives, inputs, parallel_chunk_size=self.config.parallel_chunk_size)) if inputs else []
        update = _Update(m)
        if self.engine in ("gramian", "per_sample"):  # per_sample outside forward_context: same result, slower
            weighting = gramian_weighting(aggregator)
            assert weighting is not None
            gramian = sum((b.reshape(m, -1) @ b.reshape(m, -1).T for b in blocks), objectives.new_zeros(m, m).detach())
            if not _all_finite(gramian):
                return _Update(m)
            weights = weighting(gramian).to(gramian.dtype)
            grads = [m * torch.tensordot(weights, b, dims=1) for b in blocks]
            update.gramian, update.weights = gramian, weights
        else:
            jacobian = _flat(blocks, m, objectives.detach())
            vector, weights = aggregate(aggregator, jacobian)
            grads = _unflatten(m * vector, inputs)
            if self.config.diagnostics:
                update.gramian, update.weights = jacobian @ jacobian.T, weights
                update.projections, update.update_sq_norm = jacobian @ vector, vector @ vector
        if not _all_finite(*grads, *(gd_rows or [])):
            return _Update(m)
        update.param_grads = grads[: len(params)]
        update.row_grads = gd_rows if gd_rows is not None else grads[len(params) :]
        return update

    def _per_sample_update(self, steps: Sequence[LossTerms], params: list[Tensor], rows: list[Tensor]) -> _Update:
        """``jd.engine=per_sample``: see the module docstring."""
        assert self._leaves is not None
        batch = steps[0].batch_size
        channels = [value for terms in steps for value in (terms.lm.sum(dim=1), terms.halting())]  # [B] each, step-major
        objectives = self.split.objectives(steps)
        mixing = self._mixing_matrix(steps, channels, objectives)  # [m0, C * B]
        if self.config.n_groups is not None:
            buckets = bucket_matrix(objectives.shape[0], self.config.n_groups, self._generator).to(mixing)
            mixing, objectives = buckets @ mixing, buckets.to(objectives) @ objectives
        m = objectives.shape[0]
        if not _all_finite(objectives):
            return _Update(m)

        # One backward per distinct channel: LM and halting merge when the split never separates them.
        units: list[tuple[int, Tensor, Tensor]] = []  # (step, per-sample losses [B], mixing columns [m, B])
        for k in range(len(steps)):
            lm_cols, halt_cols = mixing[:, 2 * k * batch : (2 * k + 1) * batch], mixing[:, (2 * k + 1) * batch : (2 * k + 2) * batch]
            if torch.equal(lm_cols, halt_cols):
                units.append((k, channels[2 * k] + channels[2 * k + 1], lm_cols))
            else:
                units.extend([(k, channels[2 * k], lm_cols), (k, channels[2 * k + 1], halt_cols)])
        leaves = [self._leaves[p] for p in params]
        step_rows = rows if len(rows) == len(steps) else []
        per_sample: list[list[Tensor]] = [[] for _ in leaves]  # per leaf, one [B, *shape] per unit
        row_grads: list[Tensor] = []  # per unit, [B, D] (this unit's step's rows)
        for index, (k, losses, _) in enumerate(units):
            targets = leaves + ([step_rows[k]] if step_rows else [])
            grads = _grads_of(losses.sum(), targets, retain_graph=index < len(units) - 1)
            for slot, grad in zip(per_sample, grads[: len(leaves)]):
                slot.append(grad)
            if step_rows:
                row_grads.append(grads[-1])
        coefficients = torch.cat([cols for _, _, cols in units], dim=1)  # A over the units' samples, [m, U * B]

        # Gramian of the per-sample gradients E [U * B, n], then of the objectives: G = A (E E^T) A^T.
        inner = objectives.new_zeros(len(units) * batch, len(units) * batch).float()
        for slot in per_sample:
            flat = torch.stack(slot).reshape(len(units) * batch, -1).float()
            inner += flat @ flat.T
        include_rows = self.config.include_puzzle_embedding and bool(row_grads)
        if include_rows:
            for i, (k_i, _, _) in enumerate(units):
                for j, (k_j, _, _) in enumerate(units):
                    if k_i == k_j:  # rows of different forwards are different columns of J
                        dots = (row_grads[i].float() * row_grads[j].float()).sum(dim=1)
                        inner[i * batch : (i + 1) * batch, j * batch : (j + 1) * batch] += torch.diag(dots)
        coefficients = coefficients.float()
        gramian = coefficients @ inner @ coefficients.T
        if not _all_finite(gramian):
            return _Update(m)
        aggregator = self._aggregator_for(m)
        weighting = gramian_weighting(aggregator)
        assert weighting is not None
        weights = weighting(gramian).to(gramian.dtype)
        mix = m * (coefficients.T @ weights)  # [U * B]: each per-sample gradient's coefficient in the update
        param_grads = [
            torch.tensordot(mix.to(slot[0].dtype), torch.stack(slot).reshape(len(units) * batch, *slot[0].shape[1:]), dims=1)
            for slot in per_sample
        ]
        if not _all_finite(*param_grads):
            return _Update(m)
        final_rows: list[Tensor] = []
        if step_rows:
            row_mix = mix if include_rows else (coefficients.T @ torch.ones_like(weights))
            for k, row in enumerate(step_rows):
                total = torch.zeros_like(row)
                for i, (k_i, _, _) in enumerate(units):
                    if k_i == k:
                        total = total + row_mix[i * batch : (i + 1) * batch].to(row.dtype).unsqueeze(1) * row_grads[i]
                final_rows.append(total)
        elif rows:
            final_rows = [torch.zeros_like(r) for r in rows]
        return _Update(m, param_grads=param_grads, row_grads=final_rows, gramian=gramian, weights=weights)

    def _mixing_matrix(self, steps: Sequence[LossTerms], channels: list[Tensor], objectives: Tensor) -> Tensor:
        """``A`` with ``objectives = A @ cat(channels)``, read off the split on probe losses, and checked."""
        batch, seq = steps[0].lm.shape
        device = objectives.device

        def probe(values: Tensor) -> Tensor:
            fake = []
            for k in range(len(steps)):
                lm_part, halt_part = values[2 * k * batch : (2 * k + 1) * batch], values[(2 * k + 1) * batch : (2 * k + 2) * batch]
                lm = torch.cat([lm_part.unsqueeze(1), lm_part.new_zeros(batch, seq - 1)], dim=1)
                fake.append(LossTerms(lm=lm, q_halt=2 * halt_part))  # halting() = 0.5 * q_halt
            return self.split.objectives(fake)

        zeros = torch.zeros(len(channels) * batch, device=device)
        mixing = torch.autograd.functional.jacobian(probe, zeros, vectorize=True)
        rebuilt = mixing @ torch.cat([c.detach().float() for c in channels])
        if not torch.allclose(rebuilt, objectives.detach().float(), rtol=1e-4, atol=1e-6 * max(1.0, float(objectives.detach().abs().max()))):
            raise ValueError(f"jd.engine=per_sample: jd.split={self.split.name} is not linear in per-sample losses")
        return mixing

    def _autogram_update(
        self, objectives: Tensor, aggregator: Aggregator, params: list[Tensor], rows: list[Tensor], jac_rows: list[Tensor]
    ) -> _Update:
        m = objectives.shape[0]
        if self._autogram is None:
            raise RuntimeError("jd.engine=autogram: call JDStep.attach(model) once, before the model's first forward")
        weighting = gramian_weighting(aggregator)
        assert weighting is not None and self._forward_counts is not None
        self._forward_counts.check_single_use()
        gramian = self._autogram.compute_gramian(objectives)  # also resets the engine's per-forward state
        if jac_rows:
            row_blocks = jac(objectives, jac_rows, retain_graph=True, parallel_chunk_size=self.config.parallel_chunk_size)
            row_matrix = _flat(row_blocks, m, objectives.detach())
            gramian = gramian + row_matrix @ row_matrix.T
        if not _all_finite(objectives, gramian):
            return _Update(m)
        gd_rows = self._gd_rows(objectives, rows)
        weights = weighting(gramian).to(objectives.dtype)
        grads = _grads_of(objectives, params + jac_rows, grad_output=m * weights.detach())
        if not _all_finite(*grads, *(gd_rows or [])):
            return _Update(m)
        return _Update(
            m,
            param_grads=grads[: len(params)],
            row_grads=gd_rows if gd_rows is not None else grads[len(params) :],
            gramian=gramian,
            weights=weights,
        )

    # ------------------------------------------------------------------------------- global
    def _global_update(self, objectives: Tensor, shared: int, params: list[Tensor], rows: list[Tensor]) -> _Update:
        """Exact aggregation of the global Jacobian over all ranks (see the module docstring).

        Global objectives: the ``shared`` leading ones (summed over ranks), then each rank's
        per-instance ones in rank order. Columns: the parameters, then each rank's puzzle rows.
        """
        comm = self._collective
        jac_rows = rows if self.config.include_puzzle_embedding else []
        local_m = objectives.shape[0]
        row_numel = sum(r.numel() for r in jac_rows)
        device = objectives.device
        finite = _all_finite(objectives)
        gd_rows = self._gd_rows(objectives, rows) if finite else None
        finite = finite and _all_finite(*(gd_rows or []))
        info = torch.tensor([shared, local_m - shared, row_numel, int(finite)], device=device)
        infos = comm.all_gather_rows(info.unsqueeze(0), [1] * self.world_size)
        table = torch.cat(infos).tolist()
        if len({r[0] for r in table}) != 1:
            raise RuntimeError(f"jd.split={self.split.name}: ranks disagree on the number of shared objectives: {[r[0] for r in table]}")
        instance_counts = [int(r[1]) for r in table]
        row_counts = [int(r[2]) for r in table]
        m = shared + sum(instance_counts)
        if not all(r[3] for r in table):
            return _Update(m)

        rank = comm.rank
        offsets = [shared + sum(instance_counts[:r]) for r in range(self.world_size)]
        local_index = torch.cat(
            [torch.arange(shared), torch.arange(offsets[rank], offsets[rank] + instance_counts[rank])]
        ).to(device)

        aggregator = self._aggregator_for(m)
        inputs = params + jac_rows
        blocks = list(jac(objectives, inputs, parallel_chunk_size=self.config.parallel_chunk_size))
        param_matrix = _flat(blocks[: len(params)], local_m, objectives.detach())
        row_matrix = _flat(blocks[len(params) :], local_m, objectives.detach())
        del blocks
        shared_part = param_matrix[:shared].contiguous()
        if shared > 0:
            comm.all_reduce(shared_part)
        instance_parts = comm.all_gather_rows(param_matrix[shared:].contiguous(), instance_counts)
        global_params = torch.cat([shared_part, *instance_parts])  # [m, n], identical on every rank
        del param_matrix, shared_part, instance_parts

        update = _Update(m)
        weighting = gramian_weighting(aggregator) if self.engine == "gramian" else None
        if weighting is not None:
            gramian = global_params @ global_params.T
            row_gramian = gramian.new_zeros(m, m)
            row_gramian[local_index.unsqueeze(1), local_index.unsqueeze(0)] = row_matrix @ row_matrix.T
            gramian = gramian + comm.all_reduce(row_gramian)
            if not _all_finite(gramian):
                return update
            weights = comm.broadcast_from_first(weighting(gramian).to(gramian.dtype).contiguous())
            param_vector = global_params.T @ weights
            row_vector = row_matrix.T @ weights[local_index]
            update.gramian, update.weights = gramian, weights
        else:
            jacobian, row_offsets = self._global_jacobian(global_params, row_matrix, shared, offsets, instance_counts, row_counts)
            vector, weights = aggregate(aggregator, jacobian)
            vector = comm.broadcast_from_first(vector.contiguous())
            if weights is not None:
                weights = comm.broadcast_from_first(weights.to(vector.dtype).contiguous())
            n = global_params.shape[1]
            param_vector = vector[:n]
            row_vector = vector[n + row_offsets[rank] : n + row_offsets[rank] + row_counts[rank]]
            if self.config.diagnostics:
                update.gramian, update.weights = jacobian @ jacobian.T, weights
                update.projections, update.update_sq_norm = jacobian @ vector, vector @ vector
        param_grads = _unflatten(m * param_vector, params)
        row_grads = _unflatten(m * row_vector, jac_rows)
        finite = torch.tensor([int(_all_finite(*param_grads, *row_grads))], device=device)
        if not bool(comm.all_reduce(finite, op=dist.ReduceOp.MIN).item()):  # every rank skips, or none
            return _Update(m)
        update.param_grads = param_grads
        update.row_grads = gd_rows if gd_rows is not None else row_grads
        return update

    def _global_jacobian(
        self,
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
        gathered = self._collective.all_gather_rows(local_rows, row_counts)
        m, n = global_params.shape
        row_offsets = [sum(row_counts[:r]) for r in range(self.world_size)]
        jacobian = global_params.new_zeros(m, n + sum(row_counts))
        jacobian[:, :n] = global_params
        for r, block in enumerate(gathered):
            if row_counts[r] == 0:
                continue
            index = torch.cat([torch.arange(shared), torch.arange(offsets[r], offsets[r] + instance_counts[r])]).to(jacobian.device)
            columns = slice(n + row_offsets[r], n + row_offsets[r] + row_counts[r])
            jacobian[index, columns] = block[:, : shared + instance_counts[r]].T
        return jacobian, row_offsets

    # ----------------------------------------------------------------------------------- finish
    def finish(self, params: Sequence[Tensor]) -> None:
        """Once per optimizer step: SUM-all-reduce the parameter gradients that are still rank-local
        (GD, or per-instance splits in ``local`` mode). A no-op with one process or when every
        micro-batch was aggregated globally. Puzzle rows are left alone: their optimizer gathers them."""
        if self.world_size == 1 or not self._needs_finish_reduce:
            return
        self._needs_finish_reduce = False
        params = [p for p in params if p.requires_grad]
        if not params:
            return
        device = params[0].device
        has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=device)
        has_grad = self._collective.all_reduce(has_grad, op=dist.ReduceOp.MAX).bool().tolist()
        reduced = [p for p, flag in zip(params, has_grad) if flag]
        if not reduced:
            return
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in reduced])
        self._collective.all_reduce(flat)
        for p, grad in zip(reduced, _unflatten(flat, reduced)):
            p.grad = grad

    # ---------------------------------------------------------------------------------- resume
    def state_dict(self) -> dict[str, Any]:
        """The step's own state: the bucketing generator and the skip count (stateful aggregators
        such as ``gradvac`` or ``nash_mtl`` restart their internal state on resume)."""
        return {"generator": self._generator.get_state(), "skipped_nonfinite": self._skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._generator.set_state(state["generator"])
        self._skipped = int(state["skipped_nonfinite"])


class _ForwardCounter:
    """Counts the forwards under gradient of the modules that autogram hooks (those with direct
    trainable parameters), to refuse what TorchJD 0.18's ``batch_dim=None`` autogram engine gets
    wrong: a module used more than once before the backward (weight tying, recursion, stacked
    supervision steps). Its per-module Jacobian then back-propagates into the earlier uses."""

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        self.counts: dict[str, int] = {}
        self._handles = []
        for root in modules:
            for name, module in root.named_modules():
                if any(p.requires_grad for p in module.parameters(recurse=False)):
                    self._handles.append(module.register_forward_hook(self._hook(name or type(module).__name__)))

    def _hook(self, name: str) -> Any:
        def count(_module: nn.Module, _args: Any, _output: Any) -> None:
            if torch.is_grad_enabled():
                self.counts[name] = self.counts.get(name, 0) + 1

        return count

    def check_single_use(self) -> None:
        reused = {name: n for name, n in self.counts.items() if n > 1}
        self.counts = {}
        if reused:
            name, times = next(iter(reused.items()))
            raise ValueError(
                f"jd.engine=autogram: module {name!r} ran {times} times before this backward; TorchJD 0.18's autogram "
                "engine cannot differentiate a module used more than once (weight tying, recursion as in the TRM, "
                "supervision stacks): use jd.engine=gramian"
            )


def _accumulate(tensor: Tensor, grad: Tensor) -> None:
    grad = grad.detach().to(tensor.dtype)
    if tensor.grad is None:
        tensor.grad = grad
    else:
        tensor.grad.add_(grad)


def build_jd_step(config: JDConfig, *, world_size: int = 1, group: Any = None) -> JDStep:
    """The backward step for ``config`` (``jd.*``). Bad names, kwargs or engine choices fail here,
    before any compute. ``group``: the process group for the collectives (all ranks when ``None``)."""
    return JDStep(config, split_from_config(config), world_size=world_size, group=group)
