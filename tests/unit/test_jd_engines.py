"""Every JD engine gives the gradient of the reference Jacobian path, on a tiny TRM with puzzle rows.

This file holds the unit tests; the others are in tests/integration/test_jd_engines.py.
"""

from __future__ import annotations

import pytest
import torch

from jd.config import JDConfig
from jd.step import PER_SAMPLE_SPLITS, build_jd_step
from models.losses import ACTLossHead
from models.per_sample import call_module
from models.registry import build_model
from tests.conftest import tiny_arch
from tests.unit.test_models import BATCH, PUZZLES, SEQ, VOCAB, make_batch


def engine_gradients(
    split: str,
    aggregator: str,
    engine: str,
    n_groups: int | None = None,
    include_rows: bool = True,
    forward_dtype: str = "float32",
    parallel_chunk_size: int | None = 1,
) -> tuple[list[torch.Tensor], dict[str, float]]:
    """Run the same supervision steps through one engine; return the parameter and puzzle-row gradients."""
    torch.manual_seed(0)
    arch = tiny_arch(halt_max_steps=3, halt_exploration_prob=0.0, forward_dtype=forward_dtype)
    model = build_model(arch, seq_len=SEQ, vocab_size=VOCAB, num_puzzle_identifiers=PUZZLES, device=torch.device("cpu"))
    head = ACTLossHead(model)
    config = JDConfig(
        split=split,
        aggregator=aggregator,
        engine=engine,
        n_groups=n_groups,
        include_puzzle_embedding=include_rows,
        parallel_chunk_size=parallel_chunk_size,
    )
    step = build_jd_step(config)
    params = [p for p in model.parameters() if p.requires_grad]
    carry = None
    steps = []
    torch.manual_seed(1)
    with step.forward_context(model, BATCH) as weights:
        for k in range(step.split.supervision_steps(3)):
            batch = make_batch(seed=k)
            carry = carry or head.initial_carry(batch)
            carry, terms, _, _, _ = call_module(head, weights, carry, batch, global_batch_size=BATCH)
            steps.append(terms)
        rows = [r for _, r in model.puzzle_embedding.pending_rows()]
        metrics = step.backward(steps, params, rows)
    assert step.engine == engine
    return [p.grad.clone() for p in params] + [r.grad.clone() for r in rows], metrics


@pytest.mark.parametrize("split", sorted(PER_SAMPLE_SPLITS))
@pytest.mark.parametrize("aggregator", ["upgrad", "mean", "mgda"])
def test_per_sample_engine_matches_the_jacobian_engine(split: str, aggregator: str) -> None:
    expected, reference = engine_gradients(split, aggregator, "gramian")
    got, metrics = engine_gradients(split, aggregator, "per_sample")
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=2e-4, atol=1e-6)
    assert metrics["jd/num_objectives"] == reference["jd/num_objectives"]
    assert metrics["jd/gd_similarity"] == pytest.approx(reference["jd/gd_similarity"], abs=1e-4)


def test_per_sample_engine_in_bfloat16_matches_the_jacobian_engine() -> None:
    """bfloat16 forwards (the CUDA default) through per-sample leaves give the Jacobian engine's gradient."""

    def flat(forward_dtype: str, engine: str) -> torch.Tensor:
        grads, _ = engine_gradients("iwrm_with_q_halt_in", "upgrad", engine, forward_dtype=forward_dtype)
        return torch.cat([g.flatten() for g in grads])

    expected, got = flat("bfloat16", "gramian"), flat("bfloat16", "per_sample")
    assert torch.linalg.vector_norm(got - expected) <= 1e-3 * torch.linalg.vector_norm(expected)
    # ... and the forwards did run in bfloat16: float32 rounds differently.
    assert torch.linalg.vector_norm(flat("float32", "gramian") - expected) > 1e-3 * torch.linalg.vector_norm(expected)


def test_per_sample_engine_with_bucketing_and_rows_left_out() -> None:
    for include_rows in (True, False):
        expected, _ = engine_gradients("iwrm_with_q_halt_out", "upgrad", "gramian", n_groups=3, include_rows=include_rows)
        got, metrics = engine_gradients("iwrm_with_q_halt_out", "upgrad", "per_sample", n_groups=3, include_rows=include_rows)
        assert metrics["jd/num_objectives"] == 3
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("split", ["pixelwise_q_halt_in", "lm_loss_vs_q_halt_loss"])
def test_non_gramian_aggregator_through_autojac_matches_gramian_with_mean(split: str) -> None:
    """autojac (Jacobian aggregated by TorchJD) and gramian (weights from G) agree on the mean aggregator."""
    a, _ = engine_gradients(split, "mean", "autojac", n_groups=4 if split.startswith("pixel") else None)
    b, _ = engine_gradients(split, "mean", "gramian", n_groups=4 if split.startswith("pixel") else None)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("split", "engine"), [("pixelwise_q_halt_in", "gramian"), ("lm_loss_vs_q_halt_loss", "autojac"), ("iwrm_with_q_halt_out", "gramian")]
)
def test_rows_batched_with_vmap_give_the_row_by_row_gradients(split: str, engine: str) -> None:
    aggregator = "upgrad" if engine == "gramian" else "graddrop"
    one_by_one, _ = engine_gradients(split, aggregator, engine, n_groups=4 if split.startswith("pixel") else None)
    for chunk in (None, 3):
        batched, _ = engine_gradients(split, aggregator, engine, n_groups=4 if split.startswith("pixel") else None, parallel_chunk_size=chunk)
        for a, b in zip(batched, one_by_one):
            torch.testing.assert_close(a, b, rtol=2e-4, atol=1e-6)


def test_per_sample_engine_refuses_splits_it_cannot_do() -> None:
    with pytest.raises(ValueError, match="per_sample"):
        build_jd_step(JDConfig(split="pixelwise_q_halt_in", engine="per_sample"))
    with pytest.raises(ValueError, match="per_sample"):
        build_jd_step(JDConfig(split="iwrm_with_q_halt_in", aggregator="graddrop", engine="per_sample"))
    assert build_jd_step(JDConfig(split="iwrm_with_q_halt_in")).engine == "per_sample"
    assert build_jd_step(JDConfig(split="pixelwise_q_halt_in")).engine == "gramian"


def test_the_mixing_matrix_is_kept_by_shape_and_still_checked_every_step() -> None:
    """The per-sample engine reads the split's mixing matrix off once per shape; a later step whose objectives
    the kept matrix does not rebuild (a split not linear in the per-sample losses) still fails loudly."""
    from jd.per_sample_engine import mixing_matrix
    from jd.splits import split_from_config
    from models.loss_terms import LossTerms

    split = split_from_config(JDConfig(split="lm_loss_vs_q_halt_loss"))
    terms = LossTerms(lm=torch.rand(BATCH, SEQ), q_halt=torch.rand(BATCH))
    channels = [terms.lm.sum(dim=1), terms.halting()]
    known: dict[tuple[int, ...], torch.Tensor] = {}
    first = mixing_matrix(split, [terms], channels, split.objectives([terms]), known)
    assert len(known) == 1 and torch.allclose(first @ torch.cat(channels), split.objectives([terms]))
    assert mixing_matrix(split, [terms], channels, split.objectives([terms]), known) is first
    with pytest.raises(ValueError, match="not linear in per-sample losses"):
        mixing_matrix(split, [terms], channels, split.objectives([terms]).square(), known)
