"""Loss-weighting baselines (``jd.scalarizer``): TorchJD 0.18's scalarizers by name, at the price of GD.

A scalarizer ``S`` combines the split's objectives ``l`` into one loss; one ordinary backward of
``S(l)`` follows, no Jacobian. How this step computes it, exactly and with every rank agreeing:

* the objectives' values are made global first (shared objectives summed over ranks, per-instance
  ones gathered; a few numbers per step), ``S`` is evaluated on them, and its gradient ``c = dS/dl``
  (the objectives' effective weights) comes from autograd on those values alone;
* each rank then back-propagates ``c . l_local``, whose gradients summed over ranks (the GD all-reduce)
  are exactly ``grad S(l)``. So the state of a stateful scalarizer is the same on every rank.

Stateful ones are trained and stepped the way TorchJD documents: UW's log-variances and IMTL-L's
scales are parameters learned by the run's weight optimizer (their gradient comes from ``S`` at the
global values); DWA rolls its loss history once per epoch (:meth:`ScalarizerStep.end_epoch`); FAMO
updates its weights after each optimizer step from the objectives recomputed on the same batch
(:meth:`ScalarizerStep.update`; it costs one forward without backward). Their state is part of the
JD step's checkpoint state, so resume is bit-exact. ``sum`` is exactly GD on a split that partitions the
GD loss. Unlike aggregators, the update is not multiplied by ``m``: ``S`` is the loss.

Example (UW at its start, log-variances 0: weights ``e^{-s} / 2``, log-variance gradients ``(1 - L) / 2``):
    >>> scalarizer = ScalarizerStep("uw", {}, num_objectives=2)
    >>> scalarizer.coefficients(torch.tensor([1.0, 3.0])).tolist()
    [0.5, 0.5]
    >>> [p.grad.tolist() for p in scalarizer.parameters()]
    [[0.0, -1.0]]
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torchjd import scalarization

SCALARIZERS: dict[str, type[nn.Module]] = {
    "cosmos": scalarization.COSMOS,
    "constant": scalarization.Constant,
    "dwa": scalarization.DWA,
    "famo": scalarization.FAMO,
    "geometric_mean": scalarization.GeometricMean,
    "imtl_l": scalarization.IMTLL,
    "mean": scalarization.Mean,
    "pbi": scalarization.PBI,
    "random": scalarization.Random,
    "stch": scalarization.STCH,
    "sum": scalarization.Sum,
    "uw": scalarization.UW,
}
"""Every scalarizer of ``torchjd.scalarization`` (0.18), by snake-case name."""
SIZED = frozenset({"uw", "imtl_l", "famo"})
"""Scalarizers built for a number of objectives (``shape`` = m, filled in here)."""
TENSOR_ARGUMENTS = frozenset({"weights", "reference", "min_losses"})
"""Keyword arguments given as lists and passed as tensors (one entry per objective)."""
HISTORY = frozenset({"dwa"})
"""Scalarizers that keep per-objective history across steps."""
STATEFUL_SCALARIZERS = SIZED | HISTORY
"""Scalarizers whose weights carry state from step to step, per objective (learned, or a loss history)."""


def scalarizer_names() -> list[str]:
    """Every accepted ``jd.scalarizer`` value."""
    return sorted(SCALARIZERS)


def _parameters_of(name: str) -> dict[str, inspect.Parameter]:
    signature = inspect.signature(SCALARIZERS[name].__init__)
    return {key: p for key, p in signature.parameters.items() if key not in ("self", "shape")}


def accepted_arguments(name: str) -> tuple[list[str], list[str]]:
    """``(required, optional)`` keyword arguments of scalarizer ``name`` (``shape`` is filled in)."""
    parameters = _parameters_of(name)
    required = sorted(k for k, p in parameters.items() if p.default is inspect.Parameter.empty)
    return required, sorted(set(parameters) - set(required))


def validate_scalarizer(name: str, kwargs: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming the accepted values for an unknown name, argument or a missing one."""
    if name not in SCALARIZERS:
        close = difflib.get_close_matches(str(name), scalarizer_names(), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ValueError(f"unknown jd.scalarizer {name!r}{hint}; accepted: {', '.join(scalarizer_names())}")
    required, optional = accepted_arguments(name)
    unknown = sorted(set(kwargs) - set(required) - set(optional))
    if unknown:
        raise ValueError(f"jd.scalarizer={name} got unknown jd.scalarizer_kwargs {unknown}; accepted: {required + optional}")
    missing = [key for key in required if key not in kwargs]
    if missing:
        raise ValueError(f"jd.scalarizer={name} needs jd.scalarizer_kwargs {missing} (accepted: {required + optional})")


def needs_fixed_num_objectives(name: str, kwargs: Mapping[str, Any]) -> bool:
    """Whether the scalarizer is sized for ``m`` (learned per-objective state, history, or per-objective arguments)."""
    return name in SIZED or name in HISTORY or bool(TENSOR_ARGUMENTS & set(kwargs))


class ScalarizerStep:
    """One scalarizer and what it needs across steps (see the module docstring).

    Args:
        name: ``jd.scalarizer``.
        kwargs: ``jd.scalarizer_kwargs``.
        num_objectives: ``m`` over all ranks, for the sized ones (``None`` when it may vary).
        device: where the scalarizer's parameters and buffers live.
    """

    def __init__(self, name: str, kwargs: Mapping[str, Any], *, num_objectives: int | None, device: torch.device | str = "cpu") -> None:
        validate_scalarizer(name, kwargs)
        if needs_fixed_num_objectives(name, kwargs) and num_objectives is None:
            raise ValueError(
                f"jd.scalarizer={name} keeps one value per objective, but this split's number of objectives changes from step "
                "to step (a supervision stack in the same_batch loop); use jd.supervision_loop=carry or another scalarizer"
            )
        self.name = name
        self.num_objectives = num_objectives
        converted = {k: torch.as_tensor(v, dtype=torch.float32) if k in TENSOR_ARGUMENTS and v is not None else v for k, v in kwargs.items()}
        if name in SIZED:
            converted["shape"] = num_objectives
        try:
            self.module: nn.Module = SCALARIZERS[name](**converted).to(device)
        except (TypeError, ValueError) as error:
            raise ValueError(f"jd.scalarizer={name} rejected jd.scalarizer_kwargs {dict(kwargs)}: {error}") from None
        for key in TENSOR_ARGUMENTS & set(converted):  # plain attributes, not buffers: move them by hand
            if isinstance(getattr(self.module, key, None), Tensor):
                setattr(self.module, key, getattr(self.module, key).to(device))
        self._last_values: Tensor | None = None

    def parameters(self) -> list[nn.Parameter]:
        """Parameters the run's weight optimizer learns (UW's log-variances, IMTL-L's scales)."""
        return [p for name, p in self.module.named_parameters() if not name.startswith("_")]

    @property
    def updates_after_step(self) -> bool:
        """FAMO: :meth:`update` after every optimizer step, with the objectives recomputed on the same batch."""
        return hasattr(self.module, "update")

    @property
    def has_epochs(self) -> bool:
        """DWA: :meth:`end_epoch` at the end of every epoch."""
        return hasattr(self.module, "step")

    def coefficients(self, values: Tensor) -> Tensor:
        """``dS/dl`` at the (global, detached) objective values ``values [m]``; accumulates the
        gradients of the learned parameters. The scalarizer's own per-call state moves (DWA's sums,
        FAMO's last values, Random's draw)."""
        if self.num_objectives is not None and values.numel() != self.num_objectives:
            raise ValueError(f"jd.scalarizer={self.name} was sized for {self.num_objectives} objectives, got {values.numel()}")
        leaf = values.detach().clone().requires_grad_(True)
        learned = self.parameters()
        with torch.enable_grad():
            scalar = self.module(leaf)
            grads = torch.autograd.grad(scalar, [leaf, *learned], allow_unused=True)
        for parameter, grad in zip(learned, grads[1:]):
            if grad is not None:
                parameter.grad = grad.detach() if parameter.grad is None else parameter.grad + grad.detach()
        self._last_values = values.detach()
        return torch.zeros_like(leaf) if grads[0] is None else grads[0].detach()

    def update(self, values: Tensor) -> None:
        """FAMO's step on its task weights from the objectives recomputed after the model's update."""
        self.module.update(values.detach())  # type: ignore[operator]  # FAMO's own method, untyped by TorchJD

    def end_epoch(self) -> None:
        """DWA's roll of its loss history."""
        self.module.step()  # type: ignore[operator]  # DWA's own method, untyped by TorchJD

    # -------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Parameters, buffers and the private state TorchJD keeps in attributes (DWA's history, FAMO's
        Adam and last values), as tensors, numbers and lists only (loadable with ``weights_only``)."""
        module: Any = self.module  # TorchJD's private attributes: nothing types them
        state: dict[str, Any] = {"module": {k: v.detach().clone() for k, v in module.state_dict().items()}}
        if self.name == "dwa":
            state["dwa"] = {
                "loss_sum": module._loss_sum,
                "n_batches": module._n_batches,
                "previous": list(module._previous_averages),
            }
        if self.name == "famo":
            optimizer = module._optimizer
            state["famo"] = {"previous": module._prev_losses, "optimizer": None if optimizer is None else optimizer.state_dict()}
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        module: Any = self.module  # TorchJD's private attributes: nothing types them
        module.load_state_dict(state["module"])
        if self.name == "dwa":
            saved = state["dwa"]
            module._loss_sum, module._n_batches, module._previous_averages = saved["loss_sum"], saved["n_batches"], list(saved["previous"])
        if self.name == "famo":
            saved = state["famo"]
            module._prev_losses = saved["previous"]
            if saved["optimizer"] is not None:
                module._optimizer = torch.optim.Adam([module._w], lr=module.lr, weight_decay=module.weight_decay)
                module._optimizer.load_state_dict(saved["optimizer"])


def weight_metrics(coefficients: Tensor) -> dict[str, float]:
    """``jd/scalarizer_weights_min|max|entropy`` of the objectives' effective weights ``dS/dl`` (entropy
    in nats of ``|c| / sum |c|``). No GD similarity: that needs the GD gradient, a second backward."""
    c = coefficients.detach().double().flatten()
    p = c.abs() / c.abs().sum().clamp_min(1e-300)
    entropy = -(p * p.clamp_min(1e-300).log()).sum()
    return {"jd/scalarizer_weights_min": float(c.min()), "jd/scalarizer_weights_max": float(c.max()), "jd/scalarizer_weights_entropy": float(entropy)}


def scalarized_backward(objectives: Tensor, shared: int, scalarizer: ScalarizerStep, collective: Any) -> dict[str, float]:
    """One backward of ``S`` at the global objective values (see the module docstring); returns the metrics.

    ``objectives [m]``: this rank's, the first ``shared`` of them shared across ranks (their global value
    is the sum), the rest per instance (the global vector holds every rank's, rank-major).
    """
    values = global_values(objectives, shared, collective)
    coefficients = scalarizer.coefficients(values)
    local = coefficients
    if collective.world_size > 1:  # this rank's slice: the shared head, then its own per-instance block
        own = objectives.shape[0] - shared
        start = shared + collective.rank * own
        local = torch.cat([coefficients[:shared], coefficients[start : start + own]])
    (local.to(objectives.dtype) @ objectives).backward()
    return {**weight_metrics(coefficients), "jd/num_objectives": float(values.shape[0])}


def global_values(objectives: Tensor, shared: int, collective: Any) -> Tensor:
    """The global objective vector of :func:`scalarized_backward` (for FAMO's update after the step)."""
    values = objectives.detach().float()
    if collective.world_size == 1:
        return values
    head = collective.all_reduce(values[:shared].clone())
    tails = collective.all_gather_rows(values[shared:].unsqueeze(1), [values.shape[0] - shared] * collective.world_size)
    return torch.cat([head, *(t.squeeze(1) for t in tails)])
