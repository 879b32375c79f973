"""Loss splits: m, what the objectives sum to, which sample each objective depends on, bucketing, bad input.

The stacks' default semantics are the JD study's (``jd.supervision_loop=same_batch``,
``jd.internal_loss=differential``); these tests name ``plain``/``carry`` where they check the partition
of the GD loss, and ``tests/test_study_semantics.py`` checks the study's against direct computations.
"""

from __future__ import annotations

import pytest
import torch

from jd.config import JDConfig
from jd.splits import get_split, group_objectives, split_names, validate_split
from models.loss_terms import LossTerms

B, S, H, K = 3, 4, 3, 2


W = 0.25  # jd.intermediate_loss_weight


INTERNAL_STACKS = {"stack_internal_losses", "stack_internal_losses_only", "stack_internal_and_sum"}


EXPECTED_M = {
    "none": 1,
    "lm_loss_vs_q_halt_loss": 2,
    "iwrm_with_q_halt_in": B,
    "iwrm_with_q_halt_out": 2 * B,
    "pixelwise_q_halt_in": S,
    "pixelwise_q_halt_out": S + B,
    "iwrm_pixelwise_q_halt_in": B * S,
    "iwrm_pixelwise_q_halt_out": B * S + B,
    "stack_internal_losses": H,
    "stack_internal_losses_only": H,
    "stack_internal_and_sum": 1,
    "stack_supervisions": K,
    "stack_supervisions_and_sum": 1,
    "stack_supervisions_and_iwrm": K * B,
    "stack_supervisions_and_pixelwise": K * S,
    "stack_supervisions_and_iwrm_pixelwise": K * B * S,
}


PER_INSTANCE = {
    "iwrm_with_q_halt_in",
    "iwrm_with_q_halt_out",
    "pixelwise_q_halt_out",
    "iwrm_pixelwise_q_halt_in",
    "iwrm_pixelwise_q_halt_out",
    "stack_supervisions_and_iwrm",
    "stack_supervisions_and_iwrm_pixelwise",
}


def _terms(seed: int, q_continue: bool = True) -> LossTerms:
    generator = torch.Generator().manual_seed(seed)
    lm = torch.rand(B, S, generator=generator)
    lm[:, -1] = 0.0  # an ignored position
    internal = [torch.rand(B, S, generator=generator) for _ in range(H - 1)] + [lm]
    q_cont = torch.rand(B, generator=generator) if q_continue else None
    return LossTerms(lm=lm, q_halt=torch.rand(B, generator=generator), q_continue=q_cont, internal_lm=internal)


PLAIN = {"internal_loss": "plain", "supervision_loop": "carry"}


def _steps(name: str) -> list[LossTerms]:
    count = K if get_split(name).is_supervision_stack else 1
    return [_terms(seed) for seed in range(count)]


def _sample_support(name: str) -> list[set[int]]:
    """For each objective, the samples whose losses it depends on (from its Jacobian w.r.t. the loss terms)."""
    steps = _steps(name)
    leaves = []
    for t in steps:
        t.lm.requires_grad_(True)
        t.q_halt.requires_grad_(True)
        leaves.append(t)
    objectives = get_split(name, **PLAIN).objectives(steps)
    support = []
    for objective in objectives:
        grads = torch.autograd.grad(objective, [x for t in leaves for x in (t.lm, t.q_halt)], retain_graph=True, allow_unused=True)
        samples: set[int] = set()
        for g in grads:
            if g is not None:
                nonzero = g.reshape(B, -1).abs().sum(1) > 0
                samples |= {int(b) for b in torch.nonzero(nonzero).flatten()}
        support.append(samples)
    return support


def _validate(**overrides: object) -> None:
    arch = {"halt_max_steps": 16, "H_cycles": 3, "no_ACT_continue": True}
    config_keys = {k: v for k, v in overrides.items() if k not in arch and k not in ("batch_size", "seq_len")}
    arch.update({k: v for k, v in overrides.items() if k in arch})
    sizes = {k: v for k, v in overrides.items() if k in ("batch_size", "seq_len")}
    validate_split(JDConfig(**config_keys), **arch, **sizes)  # type: ignore[arg-type]  # parametrised values


def test_every_split_of_the_study_is_registered() -> None:
    assert set(split_names()) == set(EXPECTED_M)


@pytest.mark.parametrize("name", sorted(EXPECTED_M))
def test_m_and_sum_of_the_objectives(name: str) -> None:
    spec = get_split(name, max_supervisions=K, intermediate_loss_weight=W, **PLAIN)
    steps = _steps(name)
    objectives = spec.objectives(steps)
    assert objectives.ndim == 1 and objectives.shape[0] == EXPECTED_M[name]
    assert spec.num_objectives(batch_size=B, seq_len=S, H_cycles=H, supervision_steps=len(steps)) == EXPECTED_M[name]
    assert spec.describe().startswith("m = ")
    gd_loss = sum(t.total() for t in steps)
    intermediate = sum(c.sum() for c in steps[0].internal_lm[:-1])  # type: ignore[index]  # the head was asked for them
    if name in {"stack_internal_losses", "stack_internal_and_sum"}:
        expected = gd_loss + W * intermediate
    elif name == "stack_internal_losses_only":
        expected = W * (intermediate + steps[0].lm.sum()) + steps[0].halting().sum()
    else:  # a partition of the GD loss
        expected = gd_loss
    torch.testing.assert_close(objectives.sum(), expected)


def test_halting_out_splits_keep_the_halting_loss_apart() -> None:
    terms = _terms(0)
    torch.testing.assert_close(get_split("lm_loss_vs_q_halt_loss").objectives([terms]), torch.stack([terms.lm.sum(), terms.halting().sum()]))
    torch.testing.assert_close(get_split("iwrm_with_q_halt_out").objectives([terms])[B:], terms.halting())
    torch.testing.assert_close(get_split("pixelwise_q_halt_out").objectives([terms])[:S], terms.lm.sum(0))
    torch.testing.assert_close(get_split("iwrm_pixelwise_q_halt_out").objectives([terms])[: B * S], terms.lm.flatten())
    # the halting term includes Q-continue when present, and is the Q-halt loss alone otherwise
    no_continue = _terms(0, q_continue=False)
    torch.testing.assert_close(get_split("iwrm_with_q_halt_out").objectives([no_continue])[B:], 0.5 * no_continue.q_halt)


@pytest.mark.parametrize("name", sorted(EXPECTED_M))
def test_shared_objectives_come_first_and_per_instance_ones_touch_one_sample(name: str) -> None:
    spec = get_split(name, max_supervisions=K, **PLAIN)
    steps = _steps(name)
    shared = spec.shared_count(steps)
    assert spec.per_instance == (name in PER_INSTANCE)
    assert (shared < EXPECTED_M[name]) == spec.per_instance
    support = _sample_support(name)
    assert all(len(s) == 1 for s in support[shared:]), "a per-instance objective depends on several samples"
    if name not in INTERNAL_STACKS:
        assert all(len(s) == B for s in support[:shared]), "a shared objective should sum over the batch"


def test_flags_and_supervision_steps() -> None:
    stack = get_split("stack_supervisions_and_iwrm", max_supervisions=4)
    assert stack.is_supervision_stack and not stack.needs_cycle_logits
    assert stack.supervision_steps(16) == 4 and stack.supervision_steps(3) == 3
    assert get_split("stack_internal_losses").needs_cycle_logits
    assert get_split("iwrm_with_q_halt_in").supervision_steps(16) == 1
    assert get_split("none").is_gd and not get_split("lm_loss_vs_q_halt_loss").is_gd
    assert stack.same_batch_loop and stack.batches_per_step(16) == 1
    assert get_split("stack_supervisions", supervision_loop="carry").batches_per_step(16) == 4
    assert get_split("stack_internal_losses").needs_differential_cycles
    assert get_split("stack_internal_losses").num_objectives(batch_size=B, seq_len=S, H_cycles=H) == H + 1


def test_bad_inputs_to_a_split() -> None:
    with pytest.raises(ValueError, match="unknown jd.split 'iwrm'; accepted: .*iwrm_with_q_halt_in"):
        get_split("iwrm")
    with pytest.raises(ValueError, match="one supervision step, got 2"):
        get_split("iwrm_with_q_halt_in").objectives([_terms(0), _terms(1)])
    terms = _terms(0)
    terms.internal_lm = None
    with pytest.raises(ValueError, match="keep_cycle_logits=True"):
        get_split("stack_internal_losses", internal_loss="plain").objectives([terms])
    with pytest.raises(ValueError, match="differential_cycles=True"):
        get_split("stack_internal_losses").objectives([_terms(0)])  # the study's default needs the d_i
    with pytest.raises(ValueError, match="jd.supervision_loop='loop'; accepted: same_batch, carry"):
        get_split("stack_supervisions", supervision_loop="loop")


def test_group_objectives_deals_uneven_buckets_and_keeps_the_sum() -> None:
    objectives = torch.arange(1.0, 8.0, requires_grad=True)  # m = 7
    generator = torch.Generator().manual_seed(3)
    state = generator.get_state()
    buckets = group_objectives(objectives, 3, generator)
    assert buckets.shape == (3,)
    torch.testing.assert_close(buckets.sum(), objectives.sum())
    counts = group_objectives(torch.ones(7), 3, torch.Generator().manual_seed(3))
    assert sorted(counts.tolist()) == [2.0, 2.0, 3.0]
    (grad,) = torch.autograd.grad(buckets[0], objectives)
    assert set(grad.tolist()) <= {0.0, 1.0} and grad.sum() in (2.0, 3.0)
    generator.set_state(state)
    torch.testing.assert_close(group_objectives(objectives, 3, generator), buckets)  # same state, same buckets
    with pytest.raises(ValueError, match="n_groups=8 is larger than the split's number of objectives m=7"):
        group_objectives(objectives, 8, generator)


def test_validate_split_accepts_good_configs() -> None:
    for name in split_names():
        _validate(split=name)
    _validate(split="lm_loss_vs_q_halt_loss", n_groups=2)
    _validate(split="iwrm_with_q_halt_in", n_groups=64)  # m unknown without the batch size
    _validate(split="iwrm_with_q_halt_in", n_groups=8, batch_size=8)
    _validate(split="iwrm_with_q_halt_in", no_ACT_continue=False)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"split": "nope"}, "unknown jd.split 'nope'; accepted:"),
        ({"split": "lm_loss_vs_q_halt_loss", "halt_max_steps": 1}, "halting is off"),
        ({"split": "iwrm_with_q_halt_out", "halt_max_steps": 1}, "halting is off"),
        ({"split": "stack_supervisions", "halt_max_steps": 1}, "halt_max_steps=1 gives only one"),
        ({"split": "stack_internal_and_sum", "H_cycles": 1}, "H_cycles=1 gives only one"),
        ({"split": "lm_loss_vs_q_halt_loss", "n_groups": 3}, "n_groups=3 is larger than .* m=2"),
        ({"split": "iwrm_with_q_halt_in", "n_groups": 9, "batch_size": 8}, "n_groups=9 is larger than .* m=8"),
        ({"split": "stack_supervisions", "n_groups": 5, "max_supervisions": 4}, "m=4"),
        ({"split": "none", "n_groups": 2}, "no meaning with jd.split=none"),
    ],
)
def test_validate_split_rejects_bad_configs(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        _validate(**overrides)
    assert "\n" not in str(info.value)
