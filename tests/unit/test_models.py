"""Model properties: shapes for every arch, recursion gradients, ACT halting, losses, sparse embedding."""

from __future__ import annotations

import math

import pytest
import torch

from models.loss_terms import IGNORE_LABEL_ID
from models.losses import ACTLossHead, log_stablemax, softmax_cross_entropy, stablemax_cross_entropy
from models.registry import build_model
from tests.conftest import tiny_arch

CPU = torch.device("cpu")


SEQ, VOCAB, PUZZLES, BATCH = 16, 11, 5, 4


def make_batch(batch: int = BATCH, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(1, VOCAB, (batch, SEQ), generator=g)
    labels[:, -2:] = IGNORE_LABEL_ID
    return {
        "inputs": torch.randint(0, VOCAB, (batch, SEQ), generator=g),
        "labels": labels,
        "puzzle_identifiers": torch.randint(0, PUZZLES, (batch,), generator=g),
    }


ARCHES = {
    "trm-rope": dict(name="trm"),
    "trm-learned": dict(name="trm", pos_encodings="learned"),
    "trm-mlp_t": dict(name="trm", mlp_t=True, pos_encodings="none"),
    "trm-q-continue": dict(name="trm", no_ACT_continue=False),
    "hrm": dict(name="hrm", H_layers=1),
    "transformer": dict(name="transformer", H_cycles=1, L_cycles=1),
}


@pytest.mark.parametrize("arch", list(ARCHES))
def test_forward_backward_shapes(arch: str) -> None:
    torch.manual_seed(0)
    config = tiny_arch(**ARCHES[arch])
    model = build_model(config, seq_len=SEQ, vocab_size=VOCAB, num_puzzle_identifiers=PUZZLES, device=CPU)
    head = ACTLossHead(model)
    batch = make_batch()
    carry = head.initial_carry(batch)
    carry, terms, metrics, outputs, _ = head(carry, batch, global_batch_size=BATCH)
    assert outputs["logits"].shape == (BATCH, SEQ, VOCAB)
    assert outputs["q_halt_logits"].shape == (BATCH,)
    assert terms.lm.shape == (BATCH, SEQ) and terms.q_halt.shape == (BATCH,)
    assert (terms.q_continue is not None) == (not config.no_ACT_continue)
    assert torch.all(terms.lm[:, -2:] == 0), "ignored tokens take no loss"
    terms.total().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    ((ids, rows),) = model.puzzle_embedding.pending_rows()
    assert rows.grad is not None and rows.grad.shape == (BATCH, config.puzzle_emb_ndim)
    assert torch.equal(ids, batch["puzzle_identifiers"])


def test_only_last_h_cycle_carries_gradient() -> None:
    """Earlier H-cycles run without a graph: their latent is the same with or without grad."""
    torch.manual_seed(0)
    model = build_model(tiny_arch(H_cycles=3), seq_len=SEQ, vocab_size=VOCAB, num_puzzle_identifiers=PUZZLES, device=CPU)
    batch = make_batch()
    carry = model.initial_carry(batch)
    _, outputs = model(carry, batch)
    # With one graph per cycle (internal-cycle splits) each cycle has its own logits, the last equal to the usual ones.
    torch.manual_seed(0)
    model2 = build_model(tiny_arch(H_cycles=3), seq_len=SEQ, vocab_size=VOCAB, num_puzzle_identifiers=PUZZLES, device=CPU)
    _, outputs2 = model2(model2.initial_carry(batch), batch, keep_cycle_logits=True)
    assert len(outputs2["cycle_logits"]) == 3
    torch.testing.assert_close(outputs2["cycle_logits"][-1], outputs["logits"])
    torch.testing.assert_close(outputs2["logits"], outputs["logits"])


def test_act_halts_at_max_steps_in_eval() -> None:
    torch.manual_seed(0)
    model = build_model(tiny_arch(halt_max_steps=3), seq_len=SEQ, vocab_size=VOCAB, num_puzzle_identifiers=PUZZLES, device=CPU).eval()
    batch = make_batch()
    carry = model.initial_carry(batch)
    halted_at = []
    with torch.no_grad():
        for step in range(1, 4):
            carry, _ = model(carry, batch)
            halted_at.append(bool(carry.halted.all()))
            assert torch.all(carry.steps == step)
    assert halted_at == [False, False, True], "evaluation always runs halt_max_steps steps"


def test_act_q_halt_and_exploration_in_training() -> None:
    torch.manual_seed(0)
    model = build_model(
        tiny_arch(halt_max_steps=4, halt_exploration_prob=0.0), seq_len=SEQ, vocab_size=VOCAB, num_puzzle_identifiers=PUZZLES, device=CPU
    )
    batch = make_batch()
    with torch.no_grad():
        model.core.q_head.bias.copy_(torch.tensor([5.0, 0.0]))  # q_halt > 0: halt after one step
        carry, _ = model(model.initial_carry(batch), batch)
        assert carry.halted.all() and torch.all(carry.steps == 1)
        # With exploration always on, some samples are forced to run at least 2 steps.
        model.config = model.config.model_copy(update={"halt_exploration_prob": 1.0})
        carry, _ = model(model.initial_carry(batch), batch)
        assert not carry.halted.any()
        # Halted samples are replaced by the next batch; running ones keep their data.
        other = make_batch(seed=1)
        carry.halted[0] = True
        carry, _ = model(carry, other)
        assert torch.equal(carry.data["inputs"][0], other["inputs"][0])
        assert torch.equal(carry.data["inputs"][1], batch["inputs"][1])
        assert carry.steps[0] == 1 and carry.steps[1] == 2


def test_stablemax_is_a_distribution_and_matches_formula() -> None:
    logits = torch.randn(3, 5, 7) * 4
    probs = log_stablemax(logits.double()).exp()
    torch.testing.assert_close(probs.sum(-1), torch.ones(3, 5, dtype=torch.float64))
    labels = torch.randint(0, 7, (3, 5))
    labels[0, 0] = IGNORE_LABEL_ID
    loss = stablemax_cross_entropy(logits, labels)
    s = torch.where(logits < 0, 1 / (1 - logits), logits + 1).double()
    expected = -torch.log(s.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1) / s.sum(-1))
    expected[0, 0] = 0
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    soft = softmax_cross_entropy(logits, labels)
    assert soft[0, 0] == 0 and soft[1, 1] == pytest.approx(-torch.log_softmax(logits[1, 1], -1)[labels[1, 1]].item(), rel=1e-5)


def test_loss_head_total_is_reference_formula() -> None:
    torch.manual_seed(0)
    model = build_model(tiny_arch(), seq_len=SEQ, vocab_size=VOCAB, num_puzzle_identifiers=PUZZLES, device=CPU)
    head = ACTLossHead(model)
    batch = make_batch()
    carry, terms, metrics, outputs, _ = head(head.initial_carry(batch), batch, global_batch_size=8)
    labels = batch["labels"]
    counts = (labels != IGNORE_LABEL_ID).sum(-1, keepdim=True)
    lm = (stablemax_cross_entropy(outputs["logits"], labels) / counts).sum()
    exact = ((outputs["logits"].argmax(-1) == labels) | (labels == IGNORE_LABEL_ID)).all(-1).float()
    q = torch.nn.functional.binary_cross_entropy_with_logits(outputs["q_halt_logits"], exact, reduction="sum")
    torch.testing.assert_close(terms.total(), (lm + 0.5 * q) / 8)
    assert metrics["lm_loss"].item() == pytest.approx(lm.item(), rel=1e-5)


def test_checkpoint_keys_have_no_compile_prefix_and_reload() -> None:
    torch.manual_seed(0)
    model = build_model(tiny_arch(), seq_len=SEQ, vocab_size=VOCAB, num_puzzle_identifiers=PUZZLES, device=CPU)
    state = model.state_dict()
    assert "puzzle_embedding.weights" in state and not any("_orig_mod" in k for k in state)
    other = build_model(tiny_arch(), seq_len=SEQ, vocab_size=VOCAB, num_puzzle_identifiers=PUZZLES, device=CPU)
    other.load_state_dict(state)
    for key, value in other.state_dict().items():
        assert torch.equal(value, state[key])


def test_dropout_only_in_training() -> None:
    torch.manual_seed(0)
    model = build_model(tiny_arch(dropout=0.5), seq_len=SEQ, vocab_size=VOCAB, num_puzzle_identifiers=PUZZLES, device=CPU).eval()
    batch = make_batch()
    with torch.no_grad():
        a = model(model.initial_carry(batch), batch)[1]["logits"]
        b = model(model.initial_carry(batch), batch)[1]["logits"]
    torch.testing.assert_close(a, b)
    assert math.isfinite(a.sum().item())


def test_bad_arch_values_are_rejected() -> None:
    with pytest.raises(ValueError, match="divisible"):
        tiny_arch(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="H_layers"):
        tiny_arch(name="hrm", H_layers=0)
    with pytest.raises(ValueError):
        tiny_arch(name="mamba")
