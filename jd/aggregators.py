"""TorchJD 0.18 aggregators by name (``jd.aggregator``) with validated keyword arguments (``jd.aggregator_kwargs``).

Every aggregator of :mod:`torchjd.aggregation` is reachable by a snake-case name. Keyword arguments
are checked against the constructor's signature (an unknown one is an error listing the accepted
ones); lists become tensors where the argument is a tensor (``pref_vector``, ``Constant``'s
``weights``, ``GradDrop``'s ``leak``, ...).

``upgrad`` and ``dualproj`` project onto a dual cone by solving one small quadratic program per
objective. By default this project solves them with :class:`jd.projector.PivotingProjector`, exactly
and unregularised (``reg_eps=0``), so that the update harms no objective, tiny gradients included;
batched, on the Gramian's device. ``projector`` takes a dict ``{"solver": "pivoting" | "quadprog",
"norm_eps": ..., "reg_eps": ...}``: ``{reg_eps: 1e-4}`` reproduces TorchJD's regularised programs (equal
to its quadprog solver up to round-off), ``solver: quadprog`` uses TorchJD's own
:class:`~torchjd.linalg.QuadprogProjector` (regularised, ``reg_eps=1e-4`` by default).

Notes on a few names:

* ``nash_mtl``: ``n_tasks`` defaults to the number of objectives ``m`` (filled in by the JD step).
* ``modo`` and ``sdmgrad`` are weightings designed for the cross-Gramian ``J_1 J_2^T`` of two
  independent mini-batches; here they receive the single-batch Gramian ``J J^T``, which their
  papers' convergence guarantees do not cover.
* ``cr_mogm`` smooths the weights of another weighted aggregator with an EMA:
  ``{"weighting": "upgrad", "weighting_kwargs": {...}, "alpha": 0.9, "initial_weights": [...]}``.
* ``cagrad`` and ``nash_mtl`` need cvxpy, ``fairgrad`` needs scipy: install
  ``pip install 'torchjd[<extra>]'`` or this project's ``aggregators`` extra.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torchjd import aggregation as agg
from torchjd.aggregation import Aggregator, GramianWeightedAggregator, WeightedAggregator, Weighting
from torchjd.linalg import DualConeProjector, QuadprogProjector

from jd.projector import PivotingProjector

PROJECT_EXTRA_HINT = "pip install -e '.[aggregators]'"
"""How this project installs the aggregators' optional solvers (cvxpy for cagrad / nash_mtl, scipy for fairgrad)."""


@dataclass(frozen=True)
class _Entry:
    cls: type  # whose __init__ signature lists the accepted kwargs
    extra: str | None = None  # torchjd extra holding its solver
    hidden: tuple[str, ...] = ()  # constructor arguments a config cannot express
    wrap: Callable[[Any], Aggregator] | None = None  # weighting -> aggregator, for weightings without an aggregator
    defaults_from_m: tuple[str, ...] = field(default=())  # kwargs filled with the number of objectives


_REGISTRY: dict[str, _Entry] = {
    "upgrad": _Entry(agg.UPGrad),
    "mgda": _Entry(agg.MGDA),
    "cagrad": _Entry(agg.CAGrad, extra="cagrad"),
    "pcgrad": _Entry(agg.PCGrad),
    "imtl_g": _Entry(agg.IMTLG),
    "dualproj": _Entry(agg.DualProj),
    "aligned_mtl": _Entry(agg.AlignedMTL),
    "nash_mtl": _Entry(agg.NashMTL, extra="nash_mtl", defaults_from_m=("n_tasks",)),
    "config": _Entry(agg.ConFIG),
    "graddrop": _Entry(agg.GradDrop, hidden=("f",)),
    "gradvac": _Entry(agg.GradVac),
    "fairgrad": _Entry(agg.FairGrad, extra="fairgrad"),
    "krum": _Entry(agg.Krum),
    "trimmed_mean": _Entry(agg.TrimmedMean),
    "mean": _Entry(agg.Mean),
    "sum": _Entry(agg.Sum),
    "random": _Entry(agg.Random),
    "constant": _Entry(agg.Constant),
    "pcd": _Entry(agg.PCD),
    "excess_mtl": _Entry(agg.ExcessMTL),
    "modo": _Entry(agg.MoDoWeighting, wrap=GramianWeightedAggregator),
    "sdmgrad": _Entry(agg.SDMGradWeighting, wrap=GramianWeightedAggregator),
    "cr_mogm": _Entry(agg.CRMOGMWeighting),  # built by _build_cr_mogm
}

# Weightings that depend only on the number of rows, so they can take a Gramian in place of the Jacobian.
_SHAPE_ONLY_WEIGHTINGS = (agg.MeanWeighting, agg.SumWeighting, agg.RandomWeighting, agg.ConstantWeighting)


def aggregator_names() -> list[str]:
    """Every accepted ``jd.aggregator`` value."""
    return sorted(_REGISTRY)


def _entry(name: str) -> _Entry:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(str(name), aggregator_names(), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ValueError(f"unknown jd.aggregator {name!r}{hint}; accepted: {', '.join(aggregator_names())}")
    return _REGISTRY[name]


def _init_of(cls: type) -> Any:
    """A class's ``__init__`` (read from the class, as ``inspect`` needs, not from an instance)."""
    return vars(cls).get("__init__") or cls.__init__  # type: ignore[misc]  # the class's own, or its nearest base's


def accepted_kwargs(name: str) -> list[str]:
    """The keyword arguments ``jd.aggregator_kwargs`` accepts for aggregator ``name``."""
    entry = _entry(name)
    if name == "cr_mogm":
        return ["alpha", "initial_weights", "weighting", "weighting_kwargs"]
    params = inspect.signature(_init_of(entry.cls)).parameters
    return sorted(p for p in params if p != "self" and p not in entry.hidden and params[p].kind is not inspect.Parameter.VAR_KEYWORD)


def required_kwargs(name: str) -> list[str]:
    entry = _entry(name)
    if name == "cr_mogm":
        return []
    params = inspect.signature(_init_of(entry.cls)).parameters
    return sorted(p for p in accepted_kwargs(name) if params[p].default is inspect.Parameter.empty and p not in entry.defaults_from_m)


def _is_tensor_annotation(annotation: Any) -> bool:
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    return "Tensor" in str(text) or "Tensor" in str(annotation)


PROJECTOR_SOLVERS = ("pivoting", "quadprog")
"""Accepted ``jd.aggregator_kwargs.projector.solver`` values (``pivoting`` is the default)."""


def _projector(name: str, value: Any) -> DualConeProjector:
    """The dual-cone projector of ``upgrad`` / ``dualproj`` from ``{"solver", "norm_eps", "reg_eps"}``."""
    if value is None:
        return PivotingProjector()
    if not isinstance(value, Mapping):
        raise ValueError(
            f"jd.aggregator_kwargs.projector for {name!r} must be a dict with keys solver ({'|'.join(PROJECTOR_SOLVERS)}), norm_eps, reg_eps"
        )
    unknown = sorted(set(value) - {"solver", "norm_eps", "reg_eps"})
    if unknown:
        raise ValueError(f"jd.aggregator_kwargs.projector: unknown key(s) {unknown}; accepted: ['norm_eps', 'reg_eps', 'solver']")
    solver = value.get("solver", "pivoting")
    if solver not in PROJECTOR_SOLVERS:
        raise ValueError(f"jd.aggregator_kwargs.projector.solver={solver!r}; accepted: {', '.join(PROJECTOR_SOLVERS)}")
    eps: dict[str, Any] = {key: float(v) for key, v in value.items() if key != "solver"}
    try:
        return PivotingProjector(**eps) if solver == "pivoting" else QuadprogProjector(**eps)
    except ImportError as exc:
        raise _missing_packages_error(name, exc) from exc


def _convert(name: str, key: str, value: Any) -> Any:
    """Lists -> tensors for tensor arguments; a dict -> a dual-cone projector for ``projector``."""
    if key == "projector":
        return _projector(name, value)
    annotation = inspect.signature(_init_of(_entry(name).cls)).parameters[key].annotation
    if _is_tensor_annotation(annotation) and isinstance(value, (list, tuple, int, float)) and not isinstance(value, bool):
        if isinstance(value, (int, float)) and "float" in str(annotation):
            return float(value)  # e.g. PCD's tau: float | Tensor
        return torch.tensor(value, dtype=torch.float32)
    return value


def _check_kwargs(name: str, kwargs: Mapping[str, Any]) -> None:
    accepted = accepted_kwargs(name)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"jd.aggregator={name} got unknown jd.aggregator_kwargs {unknown}; accepted: {accepted}")
    missing = [k for k in required_kwargs(name) if k not in kwargs]
    if missing:
        raise ValueError(f"jd.aggregator={name} needs jd.aggregator_kwargs {missing} (accepted: {accepted})")


def _missing_packages_error(name: str, exc: ImportError) -> ImportError:
    """An ImportError that names the pip command installing what aggregator ``name`` lacks."""
    if "quadprog" in str(exc) or "qpsolvers" in str(exc):
        extra, project = "quadprog_projector", "pip install -e ."
    else:
        extra, project = _entry(name).extra or "full", PROJECT_EXTRA_HINT
    detail = str(exc).split(". Install")[0]  # TorchJD's own hint names its extra, repeated below
    return ImportError(
        f"jd.aggregator={name} needs optional packages that are not installed ({detail}). "
        f"Install them with: pip install 'torchjd[{extra}]' (or this project's extra: {project})"
    )


def _construct(name: str, cls: type, kwargs: dict[str, Any]) -> Any:
    try:
        return cls(**kwargs)
    except ImportError as exc:
        raise _missing_packages_error(name, exc) from exc
    except (TypeError, ValueError) as exc:
        raise ValueError(f"jd.aggregator={name} rejected jd.aggregator_kwargs {kwargs}: {exc}") from exc


def _build_cr_mogm(kwargs: Mapping[str, Any], num_objectives: int | None) -> Aggregator:
    inner_name = kwargs.get("weighting", "upgrad")
    if inner_name == "cr_mogm":
        raise ValueError("jd.aggregator=cr_mogm cannot wrap itself")
    inner = build_aggregator(inner_name, dict(kwargs.get("weighting_kwargs", {})), num_objectives=num_objectives)
    smoothing: dict[str, Any] = {}
    if "alpha" in kwargs:
        smoothing["alpha"] = float(kwargs["alpha"])
    if kwargs.get("initial_weights") is not None:
        smoothing["initial_weights"] = torch.tensor(kwargs["initial_weights"], dtype=torch.float32)
    if isinstance(inner, GramianWeightedAggregator):
        return GramianWeightedAggregator(_construct("cr_mogm", agg.CRMOGMWeighting, {"weighting": inner.gramian_weighting, **smoothing}))
    if isinstance(inner, WeightedAggregator):
        return WeightedAggregator(_construct("cr_mogm", agg.CRMOGMWeighting, {"weighting": inner.weighting, **smoothing}))
    raise ValueError(f"jd.aggregator=cr_mogm smooths weights, but {inner_name!r} gives none; wrap a weighted aggregator such as upgrad")


def build_aggregator(name: str, kwargs: Mapping[str, Any] | None = None, *, num_objectives: int | None = None) -> Aggregator:
    """The TorchJD aggregator named ``name``, built from validated ``kwargs``.

    ``num_objectives`` fills arguments that must equal ``m`` (``nash_mtl``'s ``n_tasks``) when the
    user did not give them.

    Example:
        >>> build_aggregator("upgrad", {"pref_vector": [1.0, 2.0]}).__class__.__name__
        'UPGrad'
    """
    entry = _entry(name)
    kwargs = dict(kwargs or {})
    _check_kwargs(name, kwargs)
    if name == "cr_mogm":
        return _build_cr_mogm(kwargs, num_objectives)
    converted = {key: _convert(name, key, value) for key, value in kwargs.items()}
    if "projector" in inspect.signature(_init_of(entry.cls)).parameters and "projector" not in converted:
        converted["projector"] = _projector(name, None)
    for key in entry.defaults_from_m:
        if key not in converted:
            if num_objectives is None:
                raise ValueError(f"jd.aggregator={name} needs {key} (the number of objectives) before it can be built")
            converted[key] = num_objectives
    built = _construct(name, entry.cls, converted)
    return entry.wrap(built) if entry.wrap is not None else built


def validate_aggregator(name: str, kwargs: Mapping[str, Any] | None = None) -> None:
    """Build the aggregator once (with a placeholder ``m`` where one is needed), so that a bad name,
    bad kwargs or a missing optional package fail before any compute."""
    build_aggregator(name, kwargs, num_objectives=2)


def needs_num_objectives(name: str, kwargs: Mapping[str, Any] | None = None) -> bool:
    """Whether the aggregator can only be built once ``m`` is known (``nash_mtl`` without ``n_tasks``)."""
    kwargs = kwargs or {}
    if name == "cr_mogm":
        return needs_num_objectives(kwargs.get("weighting", "upgrad"), kwargs.get("weighting_kwargs", {}))
    return any(key not in kwargs for key in _entry(name).defaults_from_m)


def expected_num_objectives(name: str, kwargs: Mapping[str, Any] | None = None) -> int | None:
    """The ``m`` that the kwargs pin down (length of ``weights`` / ``pref_vector``, or ``n_tasks``), if any."""
    kwargs = kwargs or {}
    if name == "cr_mogm":
        inner = expected_num_objectives(kwargs.get("weighting", "upgrad"), kwargs.get("weighting_kwargs", {}))
        initial = kwargs.get("initial_weights")
        return inner if initial is None else len(initial)
    for key in ("weights", "pref_vector"):
        value = kwargs.get(key)
        if value is not None:
            return len(value)
    if kwargs.get("n_tasks") is not None:
        return int(kwargs["n_tasks"])
    return None


def gramian_weighting(aggregator: Aggregator) -> Weighting | None:
    """The weighting that maps the Gramian ``J J^T`` to the aggregator's weights, or ``None`` when the
    aggregator needs the Jacobian itself (``graddrop``, ``trimmed_mean``, ``config``, ``nash_mtl``, ``excess_mtl``).

    ``mean``, ``sum``, ``random`` and ``constant`` qualify: their weights depend only on ``m``.
    """
    if isinstance(aggregator, GramianWeightedAggregator):
        return aggregator.gramian_weighting
    if isinstance(aggregator, WeightedAggregator) and isinstance(aggregator.weighting, _SHAPE_ONLY_WEIGHTINGS):
        return aggregator.weighting
    return None


def aggregate(aggregator: Aggregator, jacobian: Tensor) -> tuple[Tensor, Tensor | None]:
    """Aggregate a Jacobian matrix ``[m, n]``; return the vector ``[n]`` and the weights ``[m]`` when
    the aggregator combines the rows with weights (``None`` otherwise)."""
    if isinstance(aggregator, WeightedAggregator):
        weights = aggregator.weighting(jacobian)
        return weights.to(jacobian.dtype) @ jacobian, weights
    return aggregator(jacobian), None


class AggregatorCache:
    """The aggregator for a step's number of objectives ``m``, handed to the engines.

    An aggregator that does not depend on ``m`` is built once and keeps its state; one whose kwargs are
    sized by ``m`` is rebuilt (fresh state) whenever ``m`` changes.

    Example:
        >>> cache = AggregatorCache("upgrad", {}, split_name="iwrm_with_q_halt_in")
        >>> cache.for_m(4) is cache.for_m(8)
        True
    """

    def __init__(self, name: str, kwargs: dict[str, Any], *, split_name: str) -> None:
        self.name, self.kwargs, self.split_name = name, kwargs, split_name
        self._aggregator: Aggregator | None = None
        self._m: int | None = None
        if not needs_num_objectives(name, kwargs):
            self._aggregator = build_aggregator(name, kwargs, num_objectives=2)

    def for_m(self, m: int) -> Aggregator:
        """The aggregator for ``m`` objectives; ``ValueError`` when its kwargs are sized for another ``m``."""
        expected = expected_num_objectives(self.name, self.kwargs)
        if expected is not None and expected != m:
            raise ValueError(
                f"jd.aggregator_kwargs of {self.name} are sized for {expected} objectives, but jd.split={self.split_name} gives m={m} here"
            )
        if self._aggregator is None or (self._m is not None and self._m != m):
            self._aggregator = build_aggregator(self.name, self.kwargs, num_objectives=m)
            self._m = m
        return self._aggregator
