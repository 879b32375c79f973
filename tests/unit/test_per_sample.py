"""Per-sample weights give each sample's exact gradient in one backward pass, for every arch."""

from __future__ import annotations

import pytest
import torch

from models.losses import ACTLossHead
from models.per_sample import per_sample_weights
from models.registry import build_model
from tests.conftest import tiny_arch
from tests.unit.test_models import ARCHES, BATCH, PUZZLES, SEQ, VOCAB, make_batch


@pytest.mark.parametrize("arch", list(ARCHES))
def test_per_sample_gradients_equal_individual_gradients(arch: str) -> None:
    torch.manual_seed(0)
    model = build_model(tiny_arch(**ARCHES[arch]), seq_len=SEQ, vocab_size=VOCAB, num_puzzle_identifiers=PUZZLES, device=torch.device("cpu"))
    model.config = model.config.model_copy(update={"halt_exploration_prob": 0.0})
    head = ACTLossHead(model)
    batch = make_batch()
    params = [p for p in model.parameters() if p.requires_grad]

    torch.manual_seed(1)
    _, terms, _, _, _ = head(head.initial_carry(batch), batch, global_batch_size=BATCH)
    per_sample_losses = terms.per_sample()
    expected = [torch.autograd.grad(per_sample_losses[b], params, retain_graph=True) for b in range(BATCH)]

    torch.manual_seed(1)
    shared = dict(model.named_parameters())
    weights = per_sample_weights(model, BATCH)
    leaves = weights.by_parameter
    _, terms2, _, _, _ = weights.call(head, head.initial_carry(batch), batch, global_batch_size=BATCH)
    torch.testing.assert_close(terms2.per_sample(), per_sample_losses)
    terms2.total().backward()
    for index, param in enumerate(params):
        got = leaves[param].grad
        assert got is not None and got.shape == (BATCH, *param.shape)
        for b in range(BATCH):
            torch.testing.assert_close(got[b], expected[b][index], rtol=1e-4, atol=1e-6)
    assert all(param.grad is None for param in params), "shared weights get no gradient in per-sample mode"
    assert dict(model.named_parameters()) == shared, "the model keeps its own parameters: the per-sample ones are passed to the call"
