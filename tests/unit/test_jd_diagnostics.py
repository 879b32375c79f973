"""Diagnostics from the Gramian and the weights, checked against explicit Jacobians."""

from __future__ import annotations

import math

import pytest
import torch

from jd.aggregators import aggregate, build_aggregator
from jd.diagnostics import diagnostics_from_update, diagnostics_from_weights


def _jacobian(m: int = 4, n: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_metrics_match_explicit_vectors() -> None:
    jacobian = _jacobian()
    gramian = jacobian @ jacobian.T
    weights = torch.tensor([0.1, 0.5, 0.0, -0.2], dtype=torch.float64)
    metrics = diagnostics_from_weights(gramian, weights)

    update = jacobian.T @ weights
    gd = jacobian.sum(0)
    m = jacobian.shape[0]
    assert metrics["jd/gd_similarity"] == pytest.approx((update @ gd / (update.norm() * gd.norm())).item())
    assert metrics["jd/update_norm_ratio"] == pytest.approx((update.norm() / (gd / m).norm()).item())
    cosines = [(g @ update / (g.norm() * update.norm())).item() for g in jacobian]
    assert metrics["jd/update_alignment_min"] == pytest.approx(min(cosines))
    assert metrics["jd/num_objectives"] == m
    assert metrics["jd/gramian_min"] == pytest.approx(gramian.min().item())
    assert metrics["jd/gramian_mean"] == pytest.approx(gramian.mean().item())
    assert metrics["jd/gramian_median"] == pytest.approx(gramian.flatten().median().item())
    assert metrics["jd/gramian_diag_min"] == pytest.approx(min(g.dot(g).item() for g in jacobian))
    pairs = [(i, j) for i in range(m) for j in range(i + 1, m)]
    conflicts = sum(1 for i, j in pairs if jacobian[i] @ jacobian[j] < 0)
    assert metrics["jd/conflict_fraction"] == pytest.approx(conflicts / len(pairs))
    p = weights.abs() / weights.abs().sum()
    entropy = -sum(x * math.log(x) for x in p.tolist() if x > 0)
    assert metrics["jd/weights_entropy"] == pytest.approx(entropy)
    assert metrics["jd/weights_min"] == pytest.approx(-0.2) and metrics["jd/weights_max"] == pytest.approx(0.5)


def test_mean_weights_are_gd() -> None:
    gramian = _jacobian(5) @ _jacobian(5).T
    metrics = diagnostics_from_weights(gramian, torch.full((5,), 0.2, dtype=torch.float64))
    assert metrics["jd/gd_similarity"] == pytest.approx(1.0)
    assert metrics["jd/update_norm_ratio"] == pytest.approx(1.0)
    assert metrics["jd/weights_entropy"] == pytest.approx(math.log(5))


def test_update_form_equals_weight_form_and_handles_non_weighted_aggregators() -> None:
    jacobian = _jacobian(seed=2)
    gramian = jacobian @ jacobian.T
    weights = torch.tensor([0.3, 0.1, 0.2, 0.4], dtype=torch.float64)
    update = jacobian.T @ weights
    by_weights = diagnostics_from_weights(gramian, weights)
    by_update = diagnostics_from_update(gramian, jacobian @ update, update @ update, weights)
    assert by_update == pytest.approx(by_weights)

    trimmed = build_aggregator("trimmed_mean", {"trim_number": 1})
    vector, none = aggregate(trimmed, jacobian.float())
    assert none is None
    metrics = diagnostics_from_update(gramian, jacobian @ vector.double(), vector.double() @ vector.double())
    gd = jacobian.sum(0)
    assert metrics["jd/gd_similarity"] == pytest.approx((vector.double() @ gd / (vector.double().norm() * gd.norm())).item(), rel=1e-5)
    assert "jd/weights_entropy" not in metrics


def test_upgrad_weights_give_a_non_negative_alignment() -> None:
    jacobian = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0], [0.0, 0.0, 0.0]])  # two conflicting rows, one zero
    _, weights = aggregate(build_aggregator("upgrad"), jacobian)
    assert weights is not None
    metrics = diagnostics_from_weights(jacobian @ jacobian.T, weights)
    assert metrics["jd/update_alignment_min"] >= -1e-6
    assert metrics["jd/conflict_fraction"] == pytest.approx(1 / 3)
    assert metrics["jd/gd_similarity"] < 1.0


def test_zero_update_or_zero_gradient_gives_zero_not_nan() -> None:
    gramian = torch.zeros(3, 3)
    metrics = diagnostics_from_weights(gramian, torch.ones(3))
    assert all(math.isfinite(v) for v in metrics.values())
    assert metrics["jd/gd_similarity"] == 0.0 and metrics["jd/update_norm_ratio"] == 0.0
    single = diagnostics_from_weights(torch.tensor([[4.0]]), torch.tensor([1.0]))
    assert single["jd/conflict_fraction"] == 0.0 and single["jd/gd_similarity"] == pytest.approx(1.0)
