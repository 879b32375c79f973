"""The Jacobian-descent engines behind :class:`jd.step.JDStep`: one protocol, chosen from :data:`ENGINES`.

Every engine turns one micro-batch's supervision steps into a :class:`jd.update.JDUpdate` (``m J^T w``
for the weights and puzzle rows, with the Gramian and weights for diagnostics; no gradients when
something was not finite). It is handed what it needs when it is built: the objectives of the split
(:class:`SplitObjectives`), the aggregator for each ``m`` (:class:`jd.aggregators.AggregatorCache`) and the
collectives; it never calls back into the step. ``reduces_after`` says whether its gradients are
rank-local, so that :meth:`JDStep.finish` sums them over ranks once per optimizer step.

* ``per_sample`` (:mod:`jd.per_sample_engine`): one backward per channel gives the per-sample gradients;
  the forwards must run inside :meth:`PerSampleEngine.forward_context` (the model's per-sample weights).
* ``gramian`` / ``autojac`` (:mod:`jd.jacobian_engine`): the Jacobian by rows, weighted by the Gramian or
  given whole to the aggregator.
* ``autogram`` (:mod:`jd.autogram_engine`): TorchJD's Gramian without the Jacobian.
* ``global`` (:mod:`jd.global_engine`): the exact global Jacobian over all ranks (shared splits, or
  ``jd.distributed=global``), with the ``gramian`` or ``autojac`` aggregation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torchjd.autogram import Engine as AutogramGramian

from jd.aggregators import AggregatorCache
from jd.autogram_engine import ForwardCounter, autogram_update
from jd.collective import Collective
from jd.config import JDConfig
from jd.global_engine import global_update
from jd.jacobian_engine import local_update
from jd.per_sample_engine import per_sample_update
from jd.splits import SplitSpec, group_objectives
from jd.update import JDUpdate
from models.layers import InPlaceSum
from models.loss_terms import LossTerms
from models.per_sample import PerSampleWeights, per_sample_weights


class SplitObjectives:
    """The split's objectives of a micro-batch, bucketed into ``jd.n_groups`` when set (its generator is
    checkpointed with the step)."""

    def __init__(self, split: SplitSpec, config: JDConfig) -> None:
        self.split, self.n_groups = split, config.n_groups
        self.generator = torch.Generator().manual_seed(config.seed)

    def __call__(self, steps: Sequence[LossTerms]) -> tuple[Tensor, int]:
        """The objectives ``[m]`` and how many lead as shared ones."""
        objectives = self.split.objectives(steps)
        shared = self.split.shared_count(steps)
        if self.n_groups is None:
            return objectives, shared
        fully_shared = shared == objectives.shape[0]
        groups = min(self.n_groups, objectives.shape[0]) if self.split.same_batch_loop else self.n_groups  # K shrinks when all halted
        objectives = group_objectives(objectives, groups, self.generator)
        return objectives, objectives.shape[0] if fully_shared else 0


class Engine(Protocol):
    """What every JD engine provides."""

    reduces_after: bool
    """Its gradients are rank-local: the step sums them over ranks once per optimizer step."""

    def forward_context(self, model: nn.Module, batch_size: int) -> contextlib.AbstractContextManager[PerSampleWeights | None]:
        """Wraps a micro-batch's forwards and backward; yields the weights the forwards must be called with
        (:class:`models.per_sample.PerSampleWeights` for the per-sample engine, ``None`` elsewhere)."""
        ...

    def update(self, steps: Sequence[LossTerms], params: list[Tensor], rows: list[Tensor]) -> JDUpdate:
        """The micro-batch's update (``m J^T w``) from its supervision steps' losses."""
        ...


class _EngineBase:
    reduces_after = True

    def __init__(self, name: str, config: JDConfig, objectives: SplitObjectives, aggregators: AggregatorCache, collective: Collective) -> None:
        self.name, self.config, self.objectives, self.aggregators, self.collective = name, config, objectives, aggregators, collective

    def forward_context(self, model: nn.Module, batch_size: int) -> contextlib.AbstractContextManager[PerSampleWeights | None]:
        return contextlib.nullcontext()

    def update(self, steps: Sequence[LossTerms], params: list[Tensor], rows: list[Tensor]) -> JDUpdate:
        raise NotImplementedError


class JacobianEngine(_EngineBase):
    """``gramian`` and ``autojac`` on this rank's Jacobian."""

    def update(self, steps: Sequence[LossTerms], params: list[Tensor], rows: list[Tensor]) -> JDUpdate:
        objectives, _ = self.objectives(steps)
        aggregator = self.aggregators.for_m(objectives.shape[0])
        return local_update(objectives, params, rows, aggregator=aggregator, engine=self.name, config=self.config)


class GlobalEngine(_EngineBase):
    """The exact global Jacobian over all ranks; every rank gets the same gradient (nothing to reduce after)."""

    reduces_after = False

    def update(self, steps: Sequence[LossTerms], params: list[Tensor], rows: list[Tensor]) -> JDUpdate:
        objectives, shared = self.objectives(steps)
        return global_update(
            objectives,
            shared,
            params,
            rows,
            engine=self.name,
            config=self.config,
            split_name=self.objectives.split.name,
            collective=self.collective,
            aggregators=self.aggregators,
        )


class PerSampleEngine(_EngineBase):
    """Per-sample gradients in one backward per channel; forwards outside :meth:`forward_context` fall back to
    the ``gramian`` engine (the same result)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._weights: PerSampleWeights | None = None
        self._mixings: dict[tuple[int, ...], Tensor] = {}  # the split's mixing matrices, by the losses' shapes
        self._sums: dict[nn.Parameter, InPlaceSum] = {}  # per-sample gradient buffers, reused from step to step
        self._fallback = JacobianEngine("gramian", *args[1:])

    @contextlib.contextmanager
    def _scope(self, model: nn.Module, batch_size: int) -> Iterator[PerSampleWeights]:
        weights = per_sample_weights(model, batch_size, reuse=self._sums)
        self._weights = weights
        try:
            yield weights
        finally:
            self._weights = None

    def forward_context(self, model: nn.Module, batch_size: int) -> contextlib.AbstractContextManager[PerSampleWeights | None]:
        return self._scope(model, batch_size)

    def update(self, steps: Sequence[LossTerms], params: list[Tensor], rows: list[Tensor]) -> JDUpdate:
        if self._weights is None:
            return self._fallback.update(steps, params, rows)
        return per_sample_update(
            steps,
            params,
            rows,
            split=self.objectives.split,
            weights=self._weights,
            config=self.config,
            generator=self.objectives.generator,
            aggregators=self.aggregators,
            mixings=self._mixings,
        )


class AutogramEngine(_EngineBase):
    """TorchJD's autogram Gramian; :meth:`attach` hooks the model's modules before their first forward."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._gramian: AutogramGramian | None = None
        self._counter: ForwardCounter | None = None

    def attach(self, *modules: nn.Module) -> None:
        self._gramian = AutogramGramian(*modules, batch_dim=None)
        self._counter = ForwardCounter(modules)

    def update(self, steps: Sequence[LossTerms], params: list[Tensor], rows: list[Tensor]) -> JDUpdate:
        objectives, _ = self.objectives(steps)
        aggregator = self.aggregators.for_m(objectives.shape[0])
        return autogram_update(objectives, params, rows, aggregator=aggregator, engine=self._gramian, counter=self._counter, config=self.config)


ENGINES: dict[str, type[_EngineBase]] = {
    "per_sample": PerSampleEngine,
    "gramian": JacobianEngine,
    "autojac": JacobianEngine,
    "autogram": AutogramEngine,
}
"""``jd.engine`` -> the engine on this rank's Jacobian (:class:`GlobalEngine` replaces it when ranks
aggregate one global Jacobian)."""


def build_engine(
    name: str, config: JDConfig, objectives: SplitObjectives, aggregators: AggregatorCache, collective: Collective, *, exact_global: bool
) -> Engine:
    """The engine ``name`` (validated by the step) for this run's distributed rule."""
    cls = GlobalEngine if exact_global else ENGINES[name]
    return cls(name, config, objectives, aggregators, collective)
