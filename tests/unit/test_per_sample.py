"""Per-sample weights give each sample's exact gradient in one backward pass, for every arch."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from models.layers import CastedLinear, InPlaceSum
from models.losses import ACTLossHead
from models.per_sample import per_sample_weights
from models.registry import build_model
from tests.conftest import tiny_arch
from tests.unit.test_models import ARCHES, BATCH, PUZZLES, SEQ, VOCAB, make_batch


@pytest.mark.parametrize("in_place", [True, False], ids=["in_place", "autograd"])
@pytest.mark.parametrize("arch", list(ARCHES))
def test_per_sample_gradients_equal_individual_gradients(arch: str, in_place: bool) -> None:
    """Both ways of summing a linear weight's per-sample gradient over its calls: in place (eager runs) and by
    autograd (compiled models)."""
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
    weights = per_sample_weights(model, BATCH, in_place=in_place)
    leaves = weights.by_parameter
    assert bool(weights.in_place) == in_place
    _, terms2, _, _, _ = weights.call(head, head.initial_carry(batch), batch, global_batch_size=BATCH)
    torch.testing.assert_close(terms2.per_sample(), per_sample_losses)
    terms2.total().backward()
    gradients = weights.gradients(params, [leaves[param].grad for param in params])
    for index, (param, got) in enumerate(zip(params, gradients)):
        assert got.shape == (BATCH, *param.shape)
        for b in range(BATCH):
            torch.testing.assert_close(got[b], expected[b][index], rtol=1e-4, atol=1e-6)
    assert all(param.grad is None for param in params), "shared weights get no gradient in per-sample mode"
    assert dict(model.named_parameters()) == shared, "the model keeps its own parameters: the per-sample ones are passed to the call"


def test_in_place_sums_cover_every_call_of_a_weight_and_restart_after_each_take() -> None:
    """A weight called twice in one forward, with an input that takes a gradient and with one that does not:
    the in-place sum holds both calls' shares, and is empty again once taken."""
    torch.manual_seed(0)
    layer = CastedLinear(3, 2)
    tracked, untracked = torch.randn(4, 5, 3, requires_grad=True), torch.randn(4, 5, 3)

    def loss(call: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        return (call(tracked).pow(2).sum(dim=(1, 2)) + call(untracked).sin().sum(dim=(1, 2))).sum()

    weights = per_sample_weights(layer, 4)
    leaf = weights.by_parameter[layer.weight]
    [got] = weights.gradients([layer.weight], torch.autograd.grad(loss(lambda x: weights.call(layer, x)), [leaf], allow_unused=True))
    assert weights.in_place[layer.weight].take() is None, "gradients() took the sum"
    for b in range(4):

        def one(x: torch.Tensor, b: int = b) -> torch.Tensor:
            return layer(x[b : b + 1])

        single = one(tracked).pow(2).sum() + one(untracked).sin().sum()
        torch.testing.assert_close(got[b], torch.autograd.grad(single, layer.weight)[0], rtol=1e-5, atol=1e-6)


def test_kept_in_place_sums_reuse_their_buffers_and_stay_exact() -> None:
    """Per-sample weights made with the caller's sums (``reuse``: the engine's, kept from step to step) write the next
    backward's sums into the buffers of the last, and every step's gradients are still each sample's own."""
    torch.manual_seed(0)
    layer = CastedLinear(3, 2)
    sums: dict[torch.nn.Parameter, InPlaceSum] = {}
    pointers = []
    for step in range(2):
        x = torch.randn(4, 5, 3) + step
        weights = per_sample_weights(layer, 4, reuse=sums)
        leaf = weights.by_parameter[layer.weight]
        grads = torch.autograd.grad(weights.call(layer, x).pow(2).sum(), [leaf], allow_unused=True)
        [got] = weights.gradients([layer.weight], grads)
        pointers.append(got.data_ptr())
        for b in range(4):
            expected = torch.autograd.grad(layer(x[b : b + 1]).pow(2).sum(), layer.weight)[0]
            torch.testing.assert_close(got[b], expected, rtol=1e-5, atol=1e-6)
    assert pointers[0] == pointers[1], "the second step wrote into the first step's buffer"
