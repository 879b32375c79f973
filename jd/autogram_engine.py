"""``jd.engine=autogram``: the Gramian from ``torchjd.autogram.Engine``, without materialising ``J``.

Single process or ``jd.distributed=local`` only, and only for models that use each hooked module once
per backward (:class:`ForwardCounter` refuses the rest).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from torchjd.aggregation import Aggregator
from torchjd.autogram import Engine

from jd.aggregators import gramian_weighting
from jd.config import JDConfig
from jd.update import JDUpdate, all_finite, flatten_blocks, gd_rows, grads_of, jacobian_blocks


class ForwardCounter:
    """Counts the forwards under gradient of the modules that autogram hooks (those with direct
    trainable parameters), to refuse what TorchJD 0.18's ``batch_dim=None`` autogram engine gets
    wrong: a module used more than once before the backward (weight tying, recursion, stacked
    supervision steps). Its per-module Jacobian then back-propagates into the earlier uses."""

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        self.counts: dict[str, int] = {}
        self._handles: list[RemovableHandle] = []
        for root in modules:
            for name, module in root.named_modules():
                if any(p.requires_grad for p in module.parameters(recurse=False)):
                    self._handles.append(module.register_forward_hook(self._hook(name or type(module).__name__)))

    def _hook(self, name: str) -> Callable[[nn.Module, Any, Any], None]:
        def count(_module: nn.Module, _args: Any, _output: Any) -> None:
            if torch.is_grad_enabled():
                self.counts[name] = self.counts.get(name, 0) + 1

        return count

    def remove(self) -> None:
        """Unhook the modules."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def check_single_use(self) -> None:
        """Raise if a hooked module ran more than once since the last check; reset the counts."""
        reused = {name: n for name, n in self.counts.items() if n > 1}
        self.counts = {}
        if reused:
            name, times = next(iter(reused.items()))
            raise ValueError(
                f"jd.engine=autogram: module {name!r} ran {times} times before this backward; TorchJD 0.18's autogram "
                "engine cannot differentiate a module used more than once (weight tying, recursion as in the TRM, "
                "supervision stacks): use jd.engine=gramian"
            )


def check_autogram_fits(modules: Sequence[nn.Module], run_forwards: Callable[[], object]) -> None:
    """Refuse ``jd.engine=autogram`` before training when ``run_forwards`` (one optimizer step's
    forwards, e.g. on a single sample) uses a hooked module more than once: raises ``ValueError``."""
    counter = ForwardCounter(modules)
    try:
        run_forwards()
        counter.check_single_use()
    finally:
        counter.remove()


def autogram_update(
    objectives: Tensor,
    params: list[Tensor],
    rows: list[Tensor],
    *,
    aggregator: Aggregator,
    engine: Engine | None,
    counter: ForwardCounter | None,
    config: JDConfig,
) -> JDUpdate:
    """``G`` from the hooked ``engine`` (plus the puzzle rows' part, from their small Jacobian), the
    weights ``w = weighting(G)``, then one backward of ``m w^T objectives``."""
    m = objectives.shape[0]
    if engine is None:
        raise RuntimeError("jd.engine=autogram: call JDStep.attach(model) once, before the model's first forward")
    weighting = gramian_weighting(aggregator)
    assert weighting is not None and counter is not None
    counter.check_single_use()
    gramian = engine.compute_gramian(objectives)  # also resets the engine's per-forward state
    jac_rows = rows if config.include_puzzle_embedding else []
    if jac_rows:
        row_blocks = jacobian_blocks(objectives, jac_rows, config.parallel_chunk_size, retain_graph=True)
        row_matrix = flatten_blocks(row_blocks, m, objectives.detach())
        gramian = gramian + row_matrix @ row_matrix.T
    if not all_finite(objectives, gramian):
        return JDUpdate(m)
    left_out = gd_rows(objectives, rows, config.include_puzzle_embedding)
    weights = weighting(gramian).to(objectives.dtype)
    grads = grads_of(objectives, params + jac_rows, grad_output=m * weights.detach())
    if not all_finite(*grads, *(left_out or [])):
        return JDUpdate(m)
    return JDUpdate(
        m,
        param_grads=grads[: len(params)],
        row_grads=left_out if left_out is not None else grads[len(params) :],
        gramian=gramian,
        weights=weights,
    )
