"""AdamATan2 against its update formula, the sparse sign-SGD, the LR schedule and EMA."""

from __future__ import annotations

import math

import pytest
import torch

from models.ema import EMA
from models.optimizers import AdamATan2, cosine_schedule_with_warmup
from models.sparse_embedding import SignSGDSparseEmbedding, SparsePuzzleEmbedding


def test_adam_atan2_matches_the_update_formula_over_many_steps() -> None:
    torch.manual_seed(0)
    lr, (b1, b2), wd = 0.01, (0.9, 0.95), 0.1
    param = torch.nn.Parameter(torch.randn(5, 3))
    optimizer = AdamATan2([param], lr=lr, betas=(b1, b2), weight_decay=wd)
    p, m, v = param.detach().clone().double(), torch.zeros(5, 3).double(), torch.zeros(5, 3).double()
    for t in range(1, 21):
        grad = torch.randn(5, 3)
        param.grad = grad.clone()
        optimizer.step()
        g = grad.double()
        p = p * (1 - lr * wd)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - lr / (1 - b1**t) * torch.atan2(m, v.sqrt() / math.sqrt(1 - b2**t))
        torch.testing.assert_close(param.detach().double(), p, rtol=1e-5, atol=1e-6)


def test_adam_atan2_update_is_bounded_without_epsilon() -> None:
    param = torch.nn.Parameter(torch.zeros(3))
    optimizer = AdamATan2([param], lr=1.0, betas=(0.9, 0.95), weight_decay=0.0)
    param.grad = torch.tensor([1e-30, 0.0, -1e30])
    optimizer.step()
    assert torch.isfinite(param).all()
    assert param[1] == 0  # atan2(0, 0) = 0: no step without gradient
    assert param.abs().max() <= math.pi / 2 / 0.1 + 1e-4


def test_sign_sgd_updates_only_rows_in_the_batch_and_sums_duplicates() -> None:
    embedding = SparsePuzzleEmbedding(num_embeddings=6, embedding_dim=2, cast_to=torch.float32)
    with torch.no_grad():
        embedding.weights.fill_(1.0)
    optimizer = SignSGDSparseEmbedding([embedding], lr=0.1, weight_decay=0.5)
    out = embedding(torch.tensor([2, 2, 4]))
    # Row 2 appears twice with grads +1 and -3 (sum -2 -> sign -1); row 4 gets +1.
    (out * torch.tensor([[1.0, 1.0], [-3.0, -3.0], [1.0, 1.0]])).sum().backward()
    optimizer.step()
    expected = torch.ones(6, 2)
    expected[2] = 1 * (1 - 0.1 * 0.5) + 0.1
    expected[4] = 1 * (1 - 0.1 * 0.5) - 0.1
    torch.testing.assert_close(embedding.weights, expected)
    assert embedding.pending_rows() == []


def test_sparse_embedding_eval_uses_table_without_pending_rows() -> None:
    embedding = SparsePuzzleEmbedding(num_embeddings=3, embedding_dim=2, cast_to=torch.float32).eval()
    embedding(torch.tensor([1]))
    assert embedding.pending_rows() == []


def test_cosine_schedule_warmup_and_floor() -> None:
    values = [cosine_schedule_with_warmup(s, base_lr=2.0, warmup_steps=10, total_steps=110, min_ratio=0.1) for s in range(0, 130)]
    assert values[0] == 0 and values[5] == pytest.approx(1.0) and values[10] == pytest.approx(2.0)
    assert all(a >= b - 1e-12 for a, b in zip(values[10:110], values[11:111])), "decays monotonically"
    assert values[110] == pytest.approx(0.2) and values[129] == pytest.approx(0.2)
    assert cosine_schedule_with_warmup(50, base_lr=1.0, warmup_steps=0, total_steps=100, min_ratio=1.0) == 1.0


def test_ema_tracks_average_and_swaps_back() -> None:
    layer = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        layer.weight.fill_(0.0)
    ema = EMA(layer, rate=0.5)
    with torch.no_grad():
        layer.weight.fill_(4.0)
    ema.update(layer)  # 0.5 * 0 + 0.5 * 4
    with ema.swapped_into(layer):
        assert torch.all(layer.weight == 2.0)
    assert torch.all(layer.weight == 4.0)
