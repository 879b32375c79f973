"""Aggregators by name: every TorchJD aggregator builds and runs, kwargs are validated and converted."""

from __future__ import annotations

import importlib.util
import inspect

import pytest
import torch
from torchjd import aggregation

from jd.aggregators import (
    accepted_kwargs,
    aggregate,
    aggregator_names,
    build_aggregator,
    expected_num_objectives,
    gramian_weighting,
    validate_aggregator,
)

M, N = 3, 5


REQUIRED = {
    "cagrad": {"c": 0.5},
    "fairgrad": {"alpha": 1.0},
    "krum": {"n_byzantine": 0},
    "trimmed_mean": {"trim_number": 1},
    "constant": {"weights": [1.0, 2.0, 3.0]},
}


EXTRA_MODULES = {"cagrad": "cvxpy", "nash_mtl": "cvxpy", "fairgrad": "scipy"}


JACOBIAN_ONLY = {"config", "graddrop", "trimmed_mean", "nash_mtl", "excess_mtl"}


def _jacobian(seed: int = 0) -> torch.Tensor:
    return torch.randn(M, N, generator=torch.Generator().manual_seed(seed))


def test_every_torchjd_aggregator_and_weighting_has_a_name() -> None:
    classes = {name for name in aggregation.__all__ if inspect.isclass(getattr(aggregation, name))}
    abstract = {"Aggregator", "WeightedAggregator", "GramianWeightedAggregator", "Weighting"}
    reachable = {"UPGrad", "MGDA", "CAGrad", "PCGrad", "IMTLG", "DualProj", "AlignedMTL", "NashMTL", "ConFIG", "GradDrop",
                 "GradVac", "FairGrad", "Krum", "TrimmedMean", "Mean", "Sum", "Random", "Constant", "PCD", "ExcessMTL",
                 "MoDoWeighting", "SDMGradWeighting", "CRMOGMWeighting"}  # fmt: skip
    # Every concrete class is reachable, directly or as the weighting of an aggregator we name.
    weightings_of_named = {f"{name}Weighting" for name in reachable}
    assert classes - abstract - reachable - weightings_of_named == set()
    assert len(aggregator_names()) == len(reachable)


@pytest.mark.parametrize("name", aggregator_names())
def test_every_aggregator_builds_and_aggregates_a_small_jacobian(name: str) -> None:
    if name in EXTRA_MODULES:
        pytest.importorskip(EXTRA_MODULES[name])
    if name in ("cagrad", "nash_mtl"):
        pytest.importorskip("clarabel" if name == "cagrad" else "ecos")
    aggregator = build_aggregator(name, REQUIRED.get(name, {}), num_objectives=M)
    vector, weights = aggregate(aggregator, _jacobian())
    assert vector.shape == (N,) and torch.isfinite(vector).all()
    assert weights is None or weights.shape == (M,)
    assert (gramian_weighting(aggregator) is None) == (name in JACOBIAN_ONLY)


def test_weights_from_the_gramian_reproduce_the_aggregation() -> None:
    jacobian = _jacobian(1)
    for name in ("upgrad", "mgda", "dualproj", "imtl_g", "aligned_mtl", "pcgrad", "mean", "sum", "constant"):
        aggregator = build_aggregator(name, REQUIRED.get(name, {}))
        weighting = gramian_weighting(aggregator)
        assert weighting is not None
        torch.manual_seed(0)  # PCGrad projects in a random order
        expected = aggregator(jacobian)
        torch.manual_seed(0)
        weights = weighting(jacobian @ jacobian.T).to(jacobian.dtype)
        torch.testing.assert_close(weights @ jacobian, expected, atol=1e-5, rtol=1e-4)


def test_unknown_names_and_kwargs_are_clear_errors() -> None:
    with pytest.raises(ValueError, match=r"unknown jd.aggregator 'upgrade' \(did you mean upgrad\?\); accepted: .*mgda.*upgrad"):
        build_aggregator("upgrade")
    with pytest.raises(ValueError, match=r"unknown jd.aggregator_kwargs \['pref'\]; accepted: \['pref_vector', 'projector'\]"):
        build_aggregator("upgrad", {"pref": [1.0]})
    with pytest.raises(ValueError, match=r"needs jd.aggregator_kwargs \['trim_number'\]"):
        build_aggregator("trimmed_mean")
    with pytest.raises(ValueError, match="rejected jd.aggregator_kwargs"):
        build_aggregator("mgda", {"epsilon": -1.0, "max_iters": 0})
    with pytest.raises(ValueError, match="projector: unknown key"):
        build_aggregator("upgrad", {"projector": {"eps": 1.0}})
    with pytest.raises(ValueError, match="wrap a weighted aggregator"):
        build_aggregator("cr_mogm", {"weighting": "graddrop"})
    assert "f" not in accepted_kwargs("graddrop")  # a callable cannot come from a config


def test_lists_become_tensors_where_the_argument_is_a_tensor() -> None:
    constant = build_aggregator("constant", {"weights": [1.0, 0.0, 2.0]})
    jacobian = _jacobian(2)
    torch.testing.assert_close(constant(jacobian), jacobian[0] + 2 * jacobian[2])
    preferred = build_aggregator("upgrad", {"pref_vector": [1.0, 1.0, 1.0], "projector": {"reg_eps": 1e-3}})
    assert isinstance(preferred, aggregation.UPGrad)
    assert isinstance(build_aggregator("pcd", {"tau": 1}), aggregation.PCD)
    assert isinstance(build_aggregator("graddrop", {"leak": [0.1, 0.2, 0.3]}), aggregation.GradDrop)
    assert expected_num_objectives("constant", {"weights": [1.0, 2.0]}) == 2
    assert expected_num_objectives("upgrad", {}) is None


def test_cr_mogm_smooths_the_weights_of_another_aggregator() -> None:
    smoothed = build_aggregator("cr_mogm", {"weighting": "upgrad", "alpha": 0.5})
    assert isinstance(smoothed, aggregation.GramianWeightedAggregator)
    first, second = _jacobian(3), _jacobian(4)
    w1 = aggregate(smoothed, first)[1]
    w2 = aggregate(smoothed, second)[1]
    fresh = aggregate(build_aggregator("upgrad"), second)[1]
    torch.testing.assert_close(w2, 0.5 * w1 + 0.5 * fresh)


def test_nash_mtl_takes_m_from_the_step() -> None:
    if importlib.util.find_spec("cvxpy") is None or importlib.util.find_spec("ecos") is None:
        with pytest.raises(ImportError, match=r"pip install 'torchjd\[nash_mtl\]'.*\.\[aggregators\]"):
            validate_aggregator("nash_mtl")
        return
    aggregator = build_aggregator("nash_mtl", num_objectives=M)
    assert aggregate(aggregator, _jacobian())[0].shape == (N,)


@pytest.mark.parametrize(("name", "kwargs", "extra"), [("cagrad", {"c": 0.5}, "cagrad"), ("fairgrad", {"alpha": 1.0}, "fairgrad")])
def test_missing_optional_solver_names_the_pip_command(name: str, kwargs: dict, extra: str) -> None:
    needed = {"cagrad": ["cvxpy", "clarabel"], "fairgrad": ["scipy"]}[name]
    if all(importlib.util.find_spec(module) is not None for module in needed):
        pytest.skip(f"{name}'s optional solvers ({', '.join(needed)}) are installed, so the missing-solver error cannot be triggered")
    with pytest.raises(ImportError, match=rf"pip install 'torchjd\[{extra}\]'.*\.\[aggregators\]"):
        validate_aggregator(name, kwargs)
