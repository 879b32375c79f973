"""One backward step: gradient descent or Jacobian descent, with the distributed rules.

The trainer calls :meth:`JDStep.backward` once per micro-batch and :meth:`JDStep.finish` once per
optimizer step; nothing else in the trainer knows which engine ran.

* ``jd.split=none``: ``loss.backward()`` on the GD loss and nothing else (no JD machinery, no
  host synchronisation); ``finish`` all-reduces the gradients once, as the reference code does.
* Any other split: the objectives ``[m]`` of the split (bucketed when ``jd.n_groups`` is set) are
  differentiated, the Jacobian is aggregated, and the result **multiplied by m** is accumulated
  into ``.grad``: with the ``mean`` aggregator this is exactly the GD gradient of the objectives'
  sum (the GD loss for the splits that partition it). ``jd.update_scale=one`` (the JD study) leaves
  out the factor ``m``.

Engines (``jd.engine``; ``auto`` picks ``per_sample`` for the per-instance splits where it applies,
else ``gramian`` for a Gramian-weighted aggregator, else ``autojac``):

* ``per_sample``: for splits whose objectives are linear combinations of per-sample losses
  (:data:`PER_SAMPLE_SPLITS`: IWRM, ``lm_loss_vs_q_halt_loss``, the supervision stacks except the
  pixelwise ones) and Gramian-weighted aggregators. The model is called with per-sample weight leaves
  (yielded by :meth:`JDStep.forward_context`, :mod:`models.per_sample`), so ONE backward per "channel" (the
  per-sample loss, or its LM and halting parts when the split separates them, per supervision step)
  yields the per-sample gradients ``E``: the Jacobian is ``J = A E`` with ``A`` read off the split,
  ``G = A (E E^T) A^T``, and the update ``m J^T w = m E^T (A^T w)`` needs no second backward. IWRM
  costs about one GD backward instead of ``B``. Single process or ``jd.distributed=local``. Forwards
  not called with those weights fail the per-sample backward's checks; a backward outside
  :meth:`JDStep.forward_context` falls back to the ``gramian`` path (same result).
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
* ``jd.distributed=rank_local`` (the JD study's code): every split, shared ones included, is aggregated
  on each rank's own Jacobian and ``finish`` sums the results, as the study's all-reduce did.

Non-finite objectives, Gramian or update: the micro-batch adds nothing to ``.grad``, the step
counts it (:attr:`JDStep.skipped_nonfinite`, metric ``jd/skipped_nonfinite``).

Where the code lives: this module validates the configuration, picks the engine from
:data:`jd.engines.ENGINES` (one protocol: the objectives and the aggregator are handed to it), runs GD and
the scalarizers itself and accumulates the engines' :class:`jd.update.JDUpdate`; the maths of each engine is in
:mod:`jd.per_sample_engine`, :mod:`jd.jacobian_engine` (``autojac``, ``gramian``, and the
``per_sample`` fallback), :mod:`jd.autogram_engine` and :mod:`jd.global_engine` (the exact global
aggregation over ranks, on :mod:`jd.collective`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from jd.aggregators import AggregatorCache, build_aggregator, expected_num_objectives, gramian_weighting, validate_aggregator
from jd.collective import Collective
from jd.config import JDConfig
from jd.diagnostics import diagnostics_from_update, diagnostics_from_weights
from jd.engines import AutogramEngine, Engine, SplitObjectives, build_engine
from jd.scalarizers import STATEFUL_SCALARIZERS, ScalarizerStep, global_values, scalarized_backward, validate_scalarizer
from jd.splits import SplitSpec, split_from_config
from jd.update import JDUpdate, accumulate_grad, unflatten
from models.loss_terms import LossTerms
from models.per_sample import PerSampleWeights

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


@dataclass(frozen=True)
class StepOutcome:
    """What :meth:`JDStep.finish` reports of an optimizer step's backward."""

    skipped_nonfinite: bool
    """Some micro-batch's objectives, Gramian or update were not finite, so it added nothing to ``.grad``."""


class JDStep:
    """Fills ``.grad`` of the parameters and puzzle-embedding rows from the losses of a micro-batch.

    Build it with :func:`build_jd_step`. See the module docstring for the engines, the
    ``m``-scaling, puzzle rows, gradient accumulation and the distributed semantics.
    """

    def __init__(self, config: JDConfig, split: SplitSpec, *, world_size: int = 1, group: Any = None) -> None:
        self.config = config
        self.split = split
        self.world_size = world_size
        self._collective = Collective(world_size, group)
        self.objectives = SplitObjectives(split, config)
        self._skipped = 0
        self._skipped_at_finish = 0
        self.scalarizer: ScalarizerStep | None = None
        self._engine: Engine | None = None
        self.engine = self._choose_engine()
        if self.engine not in ("gd", "scalarizer"):
            aggregators = AggregatorCache(config.aggregator_name, config.aggregator_kwargs, split_name=split.name)
            self._engine = build_engine(self.engine, config, self.objectives, aggregators, self._collective, exact_global=self.exact_global)

    def _choose_engine(self) -> str:
        """``jd.engine`` resolved (``auto``) and checked against the split, the aggregator and the ranks."""
        config, split = self.config, self.split
        if split.is_gd:
            return "gd"
        if config.scalarizer is not None:  # a loss-weighting baseline: one backward, GD's price
            validate_scalarizer(config.scalarizer, config.scalarizer_kwargs)
            return "scalarizer"
        validate_aggregator(config.aggregator_name, config.aggregator_kwargs)
        probe = build_aggregator(config.aggregator_name, config.aggregator_kwargs, num_objectives=2)
        gramian_capable = gramian_weighting(probe) is not None
        # (a puzzle-row leaf shared by a stack's forwards is not per step: the per-sample channels cannot split it)
        shared_rows = config.puzzle_rows == "shared_in_stack" and split.is_supervision_stack
        per_sample_ok = split.name in PER_SAMPLE_SPLITS and gramian_capable and not self.exact_global and not shared_rows
        if config.engine == "auto":  # per-sample gradients pay off where the objectives are per instance
            return "per_sample" if per_sample_ok and split.per_instance else "gramian" if gramian_capable else "autojac"
        if config.engine == "per_sample" and not per_sample_ok:
            raise ValueError(
                f"jd.engine=per_sample needs a split among {sorted(PER_SAMPLE_SPLITS)}, a Gramian-weighted aggregator "
                "and no global aggregation (a single process, or jd.distributed=local with a per-instance split) "
                f"(got jd.split={split.name}, jd.aggregator={config.aggregator_name}, {self.world_size} process(es)); "
                "use jd.engine=auto"
            )
        if config.engine in ("gramian", "autogram") and not gramian_capable:
            raise ValueError(
                f"jd.engine={config.engine} needs weights computed from the Gramian, but jd.aggregator={config.aggregator_name} "
                "aggregates the Jacobian itself; use jd.engine=autojac (or auto)"
            )
        if config.engine == "autogram" and self.exact_global:
            raise ValueError(
                f"jd.engine=autogram computes only this rank's Gramian, but jd.split={split.name} with {self.world_size} ranks "
                "needs the global one; use jd.engine=gramian (or auto), or jd.distributed=local for a per-instance split"
            )
        return config.engine

    # ------------------------------------------------------------------------------ properties
    @property
    def skipped_nonfinite(self) -> int:
        """Micro-batches skipped because their objectives, Gramian or update were not finite."""
        return self._skipped

    @property
    def exact_global(self) -> bool:
        """Several ranks aggregate one global Jacobian (shared splits, or ``jd.distributed=global``; never with
        ``rank_local``, the JD study's rule: each rank aggregates its own Jacobian and the results are summed)."""
        if self.world_size == 1 or self.config.distributed == "rank_local":
            return False
        return not self.split.per_instance or self.config.distributed == "global"

    @property
    def reduces_after(self) -> bool:
        """The engine's gradients are rank-local: :meth:`finish` sums them over ranks (GD, scalarizers, and
        every engine but the exact global aggregation)."""
        return self._engine.reduces_after if self._engine is not None else True

    def forward_context(self, model: nn.Module, batch_size: int) -> contextlib.AbstractContextManager[PerSampleWeights | None]:
        """Wrap the forwards (and the :meth:`backward`) of one micro-batch; yields the weights to call the model
        with: per-sample weight leaves with ``jd.engine=per_sample`` (:meth:`PerSampleWeights.call`), ``None``
        for every other engine (call the model as it is)."""
        return self._engine.forward_context(model, batch_size) if self._engine is not None else contextlib.nullcontext()

    def attach(self, *modules: nn.Module) -> None:
        """Hook the model's modules for ``jd.engine=autogram`` (before their forward); a no-op for other engines.

        Every forward of these modules under gradient must then feed the objectives (TorchJD's
        autogram engine refuses a forward without a backward)."""
        if isinstance(self._engine, AutogramEngine):
            self._engine.attach(*modules)

    # --------------------------------------------------------------------------------- backward
    def backward(self, steps: Sequence[LossTerms], params: Sequence[Tensor], puzzle_rows: Sequence[Tensor]) -> dict[str, float]:
        """Accumulate one micro-batch's gradient into ``.grad`` of ``params`` and ``puzzle_rows``.

        ``steps`` holds one :class:`LossTerms` per supervision step (one unless the split is a
        supervision stack). Returns ``jd/...`` metrics (empty for ``jd.split=none``).
        """
        if self.engine == "scalarizer":
            if self.scalarizer is None:
                raise RuntimeError("jd.scalarizer: call JDStep.build_scalarizer(m) before the first backward")
            objectives, shared = self.objectives(steps)
            metrics = scalarized_backward(objectives, shared, self.scalarizer, self._collective)
            return {**metrics, "jd/skipped_nonfinite": float(self._skipped)}
        if self._engine is None:  # GD
            total = steps[0].total()
            for terms in steps[1:]:
                total = total + terms.total()
            total.backward()
            return {}
        trained = [p for p in params if p.requires_grad]
        rows = [r for r in puzzle_rows if r.requires_grad]
        return self._apply(self._engine.update(steps, trained, rows), trained, rows)

    def prepare(self, *, batch_size: int, seq_len: int, H_cycles: int, halt_max_steps: int, grad_accum_steps: int, device: torch.device) -> list[str]:
        """Size the step for a run's micro-batches before training: build ``jd.scalarizer`` for the global
        number of objectives and check what it needs. Returns notes for the user (a large ``m``'s cost, a
        stateful scalarizer on per-instance objectives); raises ``ValueError`` for a combination that cannot run."""
        m = self.split.global_num_objectives(
            batch_size=batch_size,
            seq_len=seq_len,
            H_cycles=H_cycles,
            halt_max_steps=halt_max_steps,
            world_size=self.world_size,
            n_groups=self.config.n_groups,
        )
        scalarizer = self.build_scalarizer(m, device)
        if scalarizer is not None and scalarizer.updates_after_step and grad_accum_steps > 1:
            raise ValueError(
                f"jd.scalarizer={self.config.scalarizer} updates from the step's batch recomputed after the step; use grad_accum_steps=1"
            )
        if scalarizer is not None and m is not None:
            self._probe("scalarizer", m, lambda: scalarizer.module(torch.rand(m, device=device) + 0.5))
        if self.engine not in ("gd", "scalarizer"):
            local = self.split.num_objectives(
                batch_size=batch_size, seq_len=seq_len, H_cycles=H_cycles, supervision_steps=self.split.supervision_steps(halt_max_steps)
            )
            local = min(local, self.config.n_groups or local)
            self._check_aggregator_size(m if self.exact_global else local)
        return [note for note in (self.cost_note(m), self.scalarizer_note()) if note]

    def _check_aggregator_size(self, m: int | None) -> None:
        """The aggregator on ``m`` objectives (the most a step gives), tried before training: kwargs sized for
        another ``m`` and aggregators that need more objectives (krum, trimmed_mean) fail here, not at step 1."""
        name, kwargs = self.config.aggregator_name, self.config.aggregator_kwargs
        if m is None:
            return
        expected = expected_num_objectives(name, kwargs)
        if expected is not None and expected != m:
            raise ValueError(f"jd.aggregator_kwargs of {name} are sized for {expected} objectives, but jd.split={self.split.name} gives m={m}")
        if m <= 512 and name not in ("upgrad", "dualproj"):  # their programs take any m; a probe of a large m costs
            generator = torch.Generator().manual_seed(0)
            jacobian = torch.randn(m, 4, generator=generator)
            self._probe("aggregator", m, lambda: build_aggregator(name, kwargs, num_objectives=m)(jacobian))

    def _probe(self, what: str, m: int, attempt: Any) -> None:
        """Run ``attempt`` (a throw-away aggregation) with torch's RNG left as it was; its error names ``m``."""
        state = torch.get_rng_state()
        try:
            attempt()
        except (ValueError, RuntimeError, IndexError) as error:
            name = self.config.aggregator_name if what == "aggregator" else self.config.scalarizer
            raise ValueError(f"jd.{what}={name} cannot combine jd.split={self.split.name}'s m={m} objectives: {error}") from None
        finally:
            torch.set_rng_state(state)

    def cost_note(self, m: int | None) -> str | None:
        """A warning for the user when ``m`` objectives make a step cost many backward passes or a large
        projection (``None`` when it is cheap or ``m`` is unknown); training goes on either way."""
        if m is None or m <= 64 or self.engine in ("gd", "scalarizer"):
            return None
        if self.engine == "per_sample":  # one backward: only the projections grow with m
            if self.config.aggregator_name not in ("upgrad", "dualproj"):
                return None
            programs = m if self.config.aggregator_name == "upgrad" else 1
            return (
                f"jd.split={self.split.name} gives m={m} objectives per step: the per_sample engine needs one backward, but "
                f"{self.config.aggregator_name} solves {programs} quadratic program(s) of size {m} per step (UPGrad measured on real "
                f"Gramians of the demo task, 2 CPU threads: under 0.01 s at m=128, under 0.04 s at m=256, 0.45 s at m=512, 1.4 s at m=768, "
                f"up to 2.6x a GD step of that batch, 4.9x on a random full-rank Gramian; python -m analysis.benchmark --projector-sizes); "
                f"jd.n_groups={max(2, min(16, m // 64))} would bucket the objectives"
            )
        projection = (
            ""
            if self.config.aggregator_name not in ("upgrad", "dualproj")
            else f" and {m if self.config.aggregator_name == 'upgrad' else 1} quadratic program(s) of size {m}"
        )
        backward = f"about {m} backward passes (one per Jacobian row)" if self.engine in ("gramian", "autojac") else "a Gramian of the whole Jacobian"
        suggestion = max(2, min(16, m // 64))
        return (
            f"jd.split={self.split.name} gives m={m} objectives per step: the {self.engine} engine costs {backward}{projection} "
            f"per step, roughly {m}x a GD step (one backward); jd.n_groups={suggestion} would bucket them into {suggestion}"
        )

    def scalarizer_note(self) -> str | None:
        """Why a stateful scalarizer means something else on per-instance objectives (``None`` when it does not)."""
        name = self.config.scalarizer
        if name is None or name not in STATEFUL_SCALARIZERS or not self.split.per_instance:
            return None
        return (
            f"jd.scalarizer={name} keeps state per objective, but with jd.split={self.split.name} objective i is batch slot i, "
            "another puzzle at every step: its weights follow batch slots, not puzzles (UW's weights stay equal: IWRM + UW is GD "
            "times a scalar; FAMO's and DWA's track slots). A shared split (e.g. stack_supervisions) gives it fixed objectives"
        )

    # ------------------------------------------------------------------------------ scalarizers
    def build_scalarizer(self, num_objectives: int | None, device: torch.device) -> ScalarizerStep | None:
        """Build ``jd.scalarizer`` for ``num_objectives`` (global ``m``; ``None`` when it varies). Raises
        ``ValueError`` when the scalarizer needs a fixed ``m``. Returns it (``None`` without a scalarizer)."""
        if self.engine == "scalarizer" and self.scalarizer is None:
            assert self.config.scalarizer is not None
            self.scalarizer = ScalarizerStep(self.config.scalarizer, self.config.scalarizer_kwargs, num_objectives=num_objectives, device=device)
        return self.scalarizer

    def recomputed(self, steps: Sequence[LossTerms]) -> None:
        """FAMO: its task-weight update from the objectives recomputed on the step's batch after the
        optimizer step (``steps`` from forwards without gradient). A no-op for other methods."""
        if self.scalarizer is not None and self.scalarizer.updates_after_step:
            objectives, shared = self.objectives(steps)
            self.scalarizer.update(global_values(objectives, shared, self._collective))

    def _apply(self, update: JDUpdate, params: list[Tensor], rows: list[Tensor]) -> dict[str, float]:
        """Accumulate an update into ``.grad`` (or count it as skipped) and return its metrics."""
        if update.param_grads is None:
            self._skipped += 1
            return {"jd/skipped_nonfinite": float(self._skipped), "jd/num_objectives": float(update.num_objectives)}
        # The engines return m * J^T w; jd.update_scale=one (the JD study) takes J^T w as the aggregator gives it.
        unscale = 1.0 / update.num_objectives if self.config.update_scale == "one" else 1.0
        for tensor, grad in zip(params, update.param_grads):
            accumulate_grad(tensor, grad * unscale if unscale != 1.0 else grad)
        for tensor, grad in zip(rows, update.row_grads or []):
            accumulate_grad(tensor, grad * unscale if unscale != 1.0 else grad)
        metrics = self._diagnostics(update)
        metrics["jd/skipped_nonfinite"] = float(self._skipped)
        metrics["jd/num_objectives"] = float(update.num_objectives)
        return metrics

    def _diagnostics(self, update: JDUpdate) -> dict[str, float]:
        """The ``jd/...`` diagnostics of an applied update (empty when off or without a Gramian)."""
        if not self.config.diagnostics or update.gramian is None:
            return {}
        if update.projections is not None and update.update_sq_norm is not None:
            return diagnostics_from_update(update.gramian, update.projections, update.update_sq_norm, update.weights)
        assert update.weights is not None
        return diagnostics_from_weights(update.gramian, update.weights)

    # ----------------------------------------------------------------------------------- finish
    def finish(self, params: Sequence[Tensor]) -> StepOutcome:
        """Once per optimizer step: SUM-all-reduce the parameter gradients that are still rank-local
        (GD, or per-instance splits in ``local`` mode); nothing to reduce with one process or when every
        micro-batch was aggregated globally. Puzzle rows are left alone: their optimizer gathers them.
        Returns whether a micro-batch of the step was skipped as non-finite."""
        outcome = StepOutcome(skipped_nonfinite=self._skipped > self._skipped_at_finish)
        self._skipped_at_finish = self._skipped
        if self.world_size > 1 and self.reduces_after:
            self._reduce_rank_local(params)
        return outcome

    def _reduce_rank_local(self, params: Sequence[Tensor]) -> None:
        params = [p for p in params if p.requires_grad]
        if not params:
            return
        device = params[0].device
        local = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=device)
        has_grad = self._collective.all_reduce(local, op=dist.ReduceOp.MAX).bool().tolist()
        reduced = [p for p, flag in zip(params, has_grad) if flag]
        if not reduced:
            return
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in reduced])
        self._collective.all_reduce(flat)
        for p, grad in zip(reduced, unflatten(flat, reduced)):
            p.grad = grad

    # ---------------------------------------------------------------------------------- resume
    def state_dict(self) -> dict[str, Any]:
        """The step's own state: the bucketing generator and the skip count (stateful aggregators
        such as ``gradvac`` or ``nash_mtl`` restart their internal state on resume)."""
        state = {"generator": self.objectives.generator.get_state(), "skipped_nonfinite": self._skipped}
        if self.scalarizer is not None:
            state["scalarizer"] = self.scalarizer.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (a scalarizer's state when both have one)."""
        self.objectives.generator.set_state(state["generator"])
        self._skipped = self._skipped_at_finish = int(state["skipped_nonfinite"])
        if self.scalarizer is not None and state.get("scalarizer") is not None:
            self.scalarizer.load_state_dict(state["scalarizer"])


def build_jd_step(config: JDConfig, *, world_size: int = 1, group: Any = None, halt_max_steps: int = 1) -> JDStep:
    """The backward step for ``config`` (``jd.*``). Bad names, kwargs or engine choices fail here,
    before any compute. ``group``: the process group for the collectives (all ranks when ``None``);
    ``halt_max_steps`` (``arch.halt_max_steps``) divides the ``same_batch`` supervision stacks' LM losses."""
    return JDStep(config, split_from_config(config, halt_max_steps), world_size=world_size, group=group)
