"""The pivoting dual-cone projector: exact and conflict-free by default (``reg_eps=0``), and, regularised
(``reg_eps=1e-4``, TorchJD's setting), equal to TorchJD's quadprog projector."""

from __future__ import annotations

import itertools

import pytest
import torch
from torchjd.aggregation import DualProj, UPGrad
from torchjd.linalg import QuadprogProjector

from analysis.projector_benchmark import LATE_FAMILIES, late_training_jacobian
from jd.aggregators import build_aggregator
from jd.projector import PivotingProjector, _regularized, _solve_free_block, guess_free_sets, solve_lcp


def _jacobian(m: int, n: int, seed: int, conflicting: bool) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    jacobian = torch.randn(m, n, generator=generator, dtype=torch.float64) * torch.rand(n, generator=generator, dtype=torch.float64) * 10
    if conflicting:
        jacobian[: m // 2] *= -1
    return jacobian


def _kkt_violation(weights: torch.Tensor, lower: torch.Tensor, gramian: torch.Tensor) -> float:
    """Largest violation of ``v >= u``, ``G' v >= 0`` and ``(v - u) * G' v = 0`` (``G'`` regularised)."""
    matrix = _regularized(gramian.double(), 1e-4, 1e-4)
    excess, slack = weights.double() - lower.double(), weights.double() @ matrix
    return max((-excess).clamp_min(0).max().item(), (-slack).clamp_min(0).max().item(), (excess * slack).abs().max().item())


def _hard_jacobian(m: int, n: int, seed: int) -> torch.Tensor:
    """Conflicts with small-norm rows, a duplicate, a near-zero row and an ill-conditioned block."""
    generator = torch.Generator().manual_seed(seed)
    jacobian = torch.randn(m, n, generator=generator, dtype=torch.float64)
    k = m // 6
    jacobian[:k] *= 1e-4  # gradients with a tiny share of the Gramian's trace
    jacobian[k : 2 * k] = -0.5 * jacobian[2 * k : 3 * k] + 1e-3 * jacobian[k : 2 * k]  # near-opposite pairs
    jacobian[m // 2] = jacobian[m // 2 + 1]  # a duplicate
    jacobian[m // 2 + 2] *= 1e-12  # a near-zero row
    low_rank = torch.randn(n, 4, generator=generator, dtype=torch.float64) @ torch.randn(4, n, generator=generator, dtype=torch.float64)
    jacobian[-m // 4 :] = 0.1 * jacobian[-m // 4 :] @ low_rank / n + 1e-3 * jacobian[-m // 4 :]  # an ill-conditioned block
    return jacobian


@pytest.mark.parametrize(("m", "n"), [(1, 5), (2, 3), (7, 40), (12, 3), (30, 200), (64, 20)])
@pytest.mark.parametrize("conflicting", [False, True])
def test_equals_quadprog_and_satisfies_the_optimality_conditions(m: int, n: int, conflicting: bool) -> None:
    jacobian = _jacobian(m, n, seed=m * 1000 + n, conflicting=conflicting)
    gramian = jacobian @ jacobian.T
    lower = torch.diag(torch.full((m,), 1.0 / m, dtype=torch.float64))
    expected = QuadprogProjector()(lower, gramian)
    got = PivotingProjector(reg_eps=1e-4)(lower, gramian)
    assert got.shape == expected.shape and got.dtype == gramian.dtype
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4 * expected.abs().max().item())
    assert _kkt_violation(got, lower, gramian) < 1e-9


@pytest.mark.parametrize("guess_steps", [0, 3, 60])  # from x = 0, from a rough guess of the free sets, from a close one
def test_matches_brute_force_on_general_complementarity_problems(guess_steps: int) -> None:
    """Small positive-definite LCPs with arbitrary offsets, against enumerating every free set."""
    generator = torch.Generator().manual_seed(0)
    for _ in range(40):
        m = int(torch.randint(1, 7, (1,), generator=generator))
        factor = torch.randn(m, m, generator=generator, dtype=torch.float64)
        matrix = factor @ factor.T + 0.05 * torch.eye(m, dtype=torch.float64)
        offsets = torch.randn(5, m, generator=generator, dtype=torch.float64)
        x, solved = solve_lcp(matrix, offsets, max_iterations=100, guess_steps=guess_steps)
        assert solved.all()
        for row, q in enumerate(offsets):
            for free in itertools.product([False, True], repeat=m):
                mask = torch.tensor(free)
                candidate = torch.zeros(m, dtype=torch.float64)
                if mask.any():
                    candidate[mask] = torch.linalg.solve(matrix[mask][:, mask], -q[mask])
                slack = matrix @ candidate + q
                if (candidate >= -1e-12).all() and (slack[~mask] >= -1e-12).all():
                    torch.testing.assert_close(x[row], candidate.clamp_min(0), rtol=1e-8, atol=1e-10)
                    break
            else:
                pytest.fail(f"no free set solves problem {row}: the brute force is wrong")


def test_upgrad_update_conflicts_with_no_objective() -> None:
    jacobian = _jacobian(24, 50, seed=3, conflicting=True).float()
    update = UPGrad(projector=PivotingProjector())(jacobian)
    assert (jacobian @ update >= -1e-5 * update.norm() * jacobian.norm(dim=1)).all()


@pytest.mark.parametrize("aggregator", [UPGrad, DualProj])
@pytest.mark.parametrize(("m", "n", "seed"), [(68, 400, 0), (68, 400, 1), (24, 1000, 2), (40, 60, 3)])
def test_default_update_harms_no_objective_even_with_tiny_and_dependent_gradients(aggregator: type, m: int, n: int, seed: int) -> None:
    """Cosines from the explicit Jacobian (not the projector's own output) are >= -1e-6 at the defaults,
    where TorchJD's regularised projection harms some objective on the same Jacobians."""
    jacobian = _hard_jacobian(m, n, seed)
    update = aggregator(projector=PivotingProjector())(jacobian)
    norms = jacobian.norm(dim=1)
    cosines = (jacobian @ update) / (norms * update.norm())
    assert update.norm() > 1e-6 * norms.max() and cosines[norms > 0].min() >= -1e-6
    regularised = aggregator(projector=QuadprogProjector())(jacobian)
    assert ((jacobian @ regularised) / (norms * regularised.norm()))[norms > 0].min() < -1e-3  # what the default fixes


def test_dualproj_and_batched_shapes() -> None:
    jacobian = _jacobian(9, 30, seed=5, conflicting=True)
    regularised = PivotingProjector(reg_eps=1e-4)
    torch.testing.assert_close(DualProj(projector=regularised)(jacobian), DualProj(projector=QuadprogProjector())(jacobian), rtol=1e-4, atol=1e-6)
    gramian = jacobian @ jacobian.T
    lower = torch.rand(2, 3, 9, dtype=torch.float64)
    torch.testing.assert_close(regularised(lower, gramian), QuadprogProjector()(lower, gramian), rtol=1e-4, atol=1e-6)
    exact = PivotingProjector()(lower, gramian)
    assert exact.shape == lower.shape and ((exact @ gramian) >= -1e-9 * gramian.diagonal().sqrt() * exact.abs().sum(-1, keepdim=True)).all()


def test_unsolved_problems_fall_back_to_quadprog() -> None:
    jacobian = _jacobian(20, 10, seed=7, conflicting=True)
    gramian = jacobian @ jacobian.T
    lower = torch.diag(torch.full((20,), 0.05, dtype=torch.float64))
    expected = QuadprogProjector()(lower, gramian)
    _, solved = solve_lcp(_regularized(gramian, 1e-4, 1e-4), lower @ _regularized(gramian, 1e-4, 1e-4), max_iterations=1)
    assert not solved.all()  # so the fallback is exercised
    torch.testing.assert_close(
        PivotingProjector(reg_eps=1e-4, max_iterations=1)(lower, gramian), expected, rtol=0, atol=1e-4 * expected.abs().max().item()
    )


@pytest.mark.parametrize("scale", [1e-8, 1e-6, 1e-4, 1e-2, 1.0, 1e4, 1e8])
def test_the_exact_update_is_the_same_at_any_scale_of_the_gradients(scale: float) -> None:
    """A Gramian whose trace is below norm_eps (late in training) is rescaled, not replaced by the mean:
    the weights are those of the unscaled Gramian, and the update conflicts with no objective."""
    jacobian = _hard_jacobian(24, 200, seed=4)
    update = UPGrad(projector=PivotingProjector())(jacobian * scale)
    reference = UPGrad(projector=PivotingProjector())(jacobian) * scale
    torch.testing.assert_close(update, reference, rtol=1e-6, atol=1e-9 * reference.abs().max().item())
    norms = jacobian.norm(dim=1)
    assert ((jacobian @ update) / (norms * update.norm()))[norms > 0].min() >= -1e-6


def test_a_zero_gramian_leaves_the_weights_unchanged() -> None:
    lower = torch.diag(torch.full((4,), 0.25))
    assert torch.equal(PivotingProjector()(lower, torch.zeros(4, 4)), lower)


def test_upgrad_and_dualproj_use_it_by_default_and_quadprog_on_request() -> None:
    assert isinstance(build_aggregator("upgrad").gramian_weighting.projector, PivotingProjector)
    assert isinstance(build_aggregator("dualproj").gramian_weighting.projector, PivotingProjector)
    chosen = build_aggregator("upgrad", {"projector": {"solver": "quadprog", "reg_eps": 1e-3}}).gramian_weighting.projector
    assert isinstance(chosen, QuadprogProjector) and chosen.reg_eps == 1e-3
    assert build_aggregator("upgrad").gramian_weighting.projector.reg_eps == 0.0  # exact by default
    assert build_aggregator("upgrad", {"projector": {"reg_eps": 1e-4}}).gramian_weighting.projector.reg_eps == 1e-4


def test_bad_settings_are_named() -> None:
    with pytest.raises(ValueError, match="projector.solver='cvx'; accepted: pivoting, quadprog"):
        build_aggregator("upgrad", {"projector": {"solver": "cvx"}})
    with pytest.raises(ValueError, match="must be non-negative"):
        PivotingProjector(reg_eps=-1.0)
    with pytest.raises(ValueError, match="max_iterations must be positive"):
        PivotingProjector(max_iterations=0)


def test_where_pivoting_starts_does_not_change_the_solution() -> None:
    """The guessed free sets (the default above m = 48) only move pivoting's start: the same solutions."""
    generator = torch.Generator().manual_seed(3)
    m = 96
    factor = torch.randn(m, 2 * m, generator=generator, dtype=torch.float64)
    matrix = factor @ factor.T / (2 * m)
    offsets = torch.randn(40, m, generator=generator, dtype=torch.float64)
    guessed, solved = solve_lcp(matrix, offsets, max_iterations=100)
    cold, cold_solved = solve_lcp(matrix, offsets, max_iterations=100, guess_steps=0)
    assert solved.all() and cold_solved.all()
    torch.testing.assert_close(guessed, cold, rtol=1e-9, atol=1e-12)
    # On the identity the program separates: x = max(0, -q), so the free sets are where q < 0.
    assert torch.equal(guess_free_sets(torch.eye(m, dtype=torch.float64), offsets, 60), offsets < 0)


@pytest.mark.parametrize("m", [20, 60])  # masked at full size (m <= 48), gathered above
def test_free_blocks_equal_each_problems_own_solve(m: int) -> None:
    """Free blocks, masked or gathered to their own size and solved in groups of similar size, give each
    problem's direct solve (the minimum-norm one where the block is singular: a duplicated gradient)."""
    generator = torch.Generator().manual_seed(0)
    k = 40  # more problems than one group holds
    factor = torch.randn(m, 12, generator=generator, dtype=torch.float64)
    factor[3] = factor[5]  # a duplicate: blocks holding both are singular
    matrix = factor @ factor.T
    offsets = torch.randn(k, 12, generator=generator, dtype=torch.float64) @ factor.T  # in the range: consistent
    free = torch.rand(k, m, generator=generator) < torch.linspace(0.05, 0.6, k)[:, None]
    free[0] = False
    got = _solve_free_block(matrix, offsets, free)
    for row in range(k):
        mask = free[row]
        expected = torch.zeros(m, dtype=torch.float64)
        if mask.any():
            expected[mask] = torch.linalg.pinv(matrix[mask][:, mask], hermitian=True) @ -offsets[row, mask]
        torch.testing.assert_close(got[row], expected, rtol=1e-7, atol=1e-9)


def _update_cosines(gramian: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    norms = gramian.diagonal().sqrt()
    live = norms > 0
    return (gramian @ weights)[live] / (norms[live] * (weights @ gramian @ weights).sqrt())


@pytest.mark.parametrize("size", [64, 128, 256])
def test_real_harvested_gramians_get_conflict_free_updates(size: int) -> None:
    """The committed Gramians of IWRM training on the demo task (``tests/fixtures/gramians``, made by
    ``python -m analysis.harvest_gramians``): UPGrad's update harms no objective, at every stage."""
    from analysis.harvest_gramians import load_gramians
    from analysis.projector_benchmark import HARVESTED, upgrad_weights

    cases = {name: gramian for name, gramian in load_gramians(HARVESTED).items() if gramian.shape[0] == size}
    assert len(cases) == 3  # early, mid and late training
    for name, gramian in cases.items():
        cosines = _update_cosines(gramian, upgrad_weights(PivotingProjector(), gramian))
        assert cosines.min() >= -1e-6, name


@pytest.mark.parametrize("family", LATE_FAMILIES)
def test_late_training_families_get_conflict_free_updates(family: str) -> None:
    """Cosines from the explicit Jacobian: >= -1e-6 for every objective with a gradient."""
    jacobian = late_training_jacobian(family, m=128)
    update = UPGrad(projector=PivotingProjector())(jacobian)
    norms = jacobian.norm(dim=1)
    cosines = (jacobian @ update)[norms > 0] / (norms[norms > 0] * update.norm())
    assert update.norm() > 0 and cosines.min() >= -1e-6
