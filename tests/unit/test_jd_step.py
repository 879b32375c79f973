"""The JD step: GD equivalence of the mean aggregator for every split, UPGrad's guarantee, engines, rows,
accumulation, non-finite skips, bucketing, resume; on a toy recursive model and a tiny TRM.

The toy model at the top is also used by tests/test_jd_distributed.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchjd.autojac import backward as autojac_backward
from torchjd.autojac import jac_to_grad

from jd.aggregators import build_aggregator
from jd.config import JDConfig
from jd.splits import get_split, split_names
from jd.step import build_jd_step
from models.loss_terms import IGNORE_LABEL_ID, LossTerms
from tests.conftest import tiny_trm_batch

VOCAB = 5


DIM = 6


SEQ = 4


NUM_PUZZLES = 7


class ToyRecursiveModel(nn.Module):
    """Embedding (+ a puzzle row per sample) -> ``cycles`` applications of one shared layer, an LM head
    read after every cycle, and a two-logit Q-head on the first position."""

    def __init__(self, cycles: int = 2) -> None:
        super().__init__()
        self.cycles = cycles
        self.embed = nn.Embedding(VOCAB, DIM)
        self.mix = nn.Linear(DIM, DIM)
        self.lm_head = nn.Linear(DIM, VOCAB)
        self.q_head = nn.Linear(DIM, 2)

    def forward(self, tokens: Tensor, rows: Tensor, state: Tensor | None, keep_cycles: bool) -> tuple[list[Tensor], Tensor, Tensor, Tensor]:
        """Logits of every cycle when ``keep_cycles``, else of the last one only."""
        injected = self.embed(tokens) + rows.unsqueeze(1)
        hidden = injected if state is None else injected + state
        cycle_logits = []
        for cycle in range(self.cycles):
            hidden = torch.tanh(self.mix(hidden) + injected)
            if keep_cycles or cycle == self.cycles - 1:
                cycle_logits.append(self.lm_head(hidden))
        q = self.q_head(hidden[:, 0])
        return cycle_logits, q[:, 0], q[:, 1], hidden


@dataclass
class ToyBatch:
    tokens: Tensor  # [B, S]
    labels: Tensor  # [B, S], some IGNORE_LABEL_ID
    puzzle_ids: Tensor  # [B]

    def part(self, index: slice) -> ToyBatch:
        return ToyBatch(self.tokens[index], self.labels[index], self.puzzle_ids[index])


def make_batch(batch_size: int, seed: int = 0) -> ToyBatch:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (batch_size, SEQ), generator=generator)
    labels = torch.randint(0, VOCAB, (batch_size, SEQ), generator=generator)
    labels[:, -1] = IGNORE_LABEL_ID  # a padded position
    labels[0, 0] = tokens[0, 0]
    puzzle_ids = torch.randint(0, NUM_PUZZLES, (batch_size,), generator=generator)
    return ToyBatch(tokens, labels, puzzle_ids)


def make_model(cycles: int = 2, seed: int = 0) -> tuple[ToyRecursiveModel, Tensor]:
    """The model and its puzzle-embedding table (a plain tensor, rows are copied out per forward)."""
    torch.manual_seed(seed)
    model = ToyRecursiveModel(cycles)
    table = torch.randn(NUM_PUZZLES, DIM) * 0.5
    return model, table


def run_steps(
    model: ToyRecursiveModel,
    table: Tensor,
    batch: ToyBatch,
    *,
    global_batch_size: int,
    supervision_steps: int = 1,
    q_continue: bool = True,
    keep_cycles: bool = True,
) -> tuple[list[LossTerms], list[Tensor]]:
    """Run ``supervision_steps`` steps (state carried, detached); return their LossTerms and the
    puzzle-row leaves (one per forward, like ``SparsePuzzleEmbedding.pending_rows``)."""
    steps: list[LossTerms] = []
    rows_leaves: list[Tensor] = []
    state = None
    scale = 1.0 / global_batch_size
    mask = batch.labels != IGNORE_LABEL_ID
    divisor = mask.sum(-1).clamp_min(1).unsqueeze(-1)
    for _ in range(supervision_steps):
        rows = table[batch.puzzle_ids].clone().requires_grad_(True)
        rows_leaves.append(rows)
        cycle_logits, q_halt_logits, q_continue_logits, hidden = model(batch.tokens, rows, state, keep_cycles)
        state = hidden.detach()

        def ce_of(logits: Tensor) -> Tensor:
            return F.cross_entropy(logits.reshape(-1, VOCAB), batch.labels.reshape(-1), ignore_index=IGNORE_LABEL_ID, reduction="none").view(
                batch.labels.shape
            )

        def lm_of(logits: Tensor) -> Tensor:
            return ce_of(logits) / divisor * scale

        lm = lm_of(cycle_logits[-1])
        with torch.no_grad():
            exact = ((cycle_logits[-1].argmax(-1) == batch.labels) | ~mask).all(-1).float()
        q_halt = F.binary_cross_entropy_with_logits(q_halt_logits, exact, reduction="none") * scale
        q_cont = F.binary_cross_entropy_with_logits(q_continue_logits, torch.full_like(exact, 0.3), reduction="none") * scale if q_continue else None
        internal = [lm_of(c) for c in cycle_logits[:-1]] + [lm] if keep_cycles else None
        previous = [torch.zeros_like(cycle_logits[0])] + [c.detach() for c in cycle_logits[:-1]]
        differential = [ce_of(c - p) * scale for c, p in zip(cycle_logits, previous)] if keep_cycles else None
        steps.append(LossTerms(lm=lm, q_halt=q_halt, q_continue=q_cont, internal_lm=internal, internal_differential=differential))
    return steps, rows_leaves


def flat_grads(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([(t.grad if t.grad is not None else torch.zeros_like(t)).reshape(-1) for t in tensors])


B = 3


HALT_MAX_STEPS = 5


JD_SPLITS = [name for name in split_names() if name != "none"]


INTERNAL_STACKS = {"stack_internal_losses", "stack_internal_losses_only", "stack_internal_and_sum"}


def _problem(config: JDConfig, *, seed: int = 0, batch_size: int = B, attach: bool = False, cycles: int = 2):
    """A JD step for ``config`` and one micro-batch of the toy model: (step, params, steps, rows)."""
    step = build_jd_step(config)
    model, table = make_model(cycles=cycles, seed=seed)
    if attach:
        step.attach(model)
    steps, rows = run_steps(
        model,
        table,
        make_batch(batch_size, seed=seed),
        global_batch_size=batch_size,
        supervision_steps=step.split.supervision_steps(HALT_MAX_STEPS),
        keep_cycles=step.split.needs_cycle_logits,
    )
    return step, list(model.parameters()), steps, rows


def _grad(output: Tensor, inputs: Sequence[Tensor]) -> Tensor:
    grads = torch.autograd.grad(output, list(inputs), retain_graph=True, allow_unused=True)
    return torch.cat([(torch.zeros_like(t) if g is None else g).reshape(-1) for g, t in zip(grads, inputs)])


ENGINE_SPLITS = [(split, engine) for split in JD_SPLITS for engine in ("autojac", "gramian")] + [
    (split, "autogram") for split in JD_SPLITS if split not in INTERNAL_STACKS and "supervisions" not in split
]


STACK_SEMANTICS = {"study": {}, "plain": {"internal_loss": "plain", "supervision_loop": "carry"}}


SEMANTIC_SPLITS = [
    (split, engine, semantics)
    for split, engine in ENGINE_SPLITS
    for semantics in STACK_SEMANTICS
    if semantics == "study" or split in INTERNAL_STACKS or "supervisions" in split
]


CONFLICTING = [("iwrm_pixelwise_q_halt_in", 0), ("iwrm_pixelwise_q_halt_out", 3), ("stack_supervisions_and_iwrm_pixelwise", 1)]


def _tiny_trm_steps(split: str, *, engine: str = "auto", aggregator: str = "mean"):
    from models.losses import ACTLossHead
    from models.recursive_reasoning.config import ArchConfig
    from models.registry import build_model

    arch = ArchConfig(
        hidden_size=32,
        num_heads=2,
        L_layers=1,
        H_cycles=2,
        L_cycles=1,
        puzzle_emb_ndim=32,
        puzzle_emb_len=1,
        halt_max_steps=2,
        forward_dtype="float32",
    )
    torch.manual_seed(0)
    model = build_model(arch, seq_len=16, vocab_size=11, num_puzzle_identifiers=4, device=torch.device("cpu"))
    model.puzzle_embedding.weights.normal_(std=0.1)
    config = JDConfig(split=split, engine=engine, aggregator=aggregator, max_supervisions=2)
    step = build_jd_step(config)
    step.attach(model)
    head = ACTLossHead(model)
    batch = tiny_trm_batch()
    carry = head.initial_carry(batch)
    steps = []
    for _ in range(step.split.supervision_steps(arch.halt_max_steps)):
        carry, terms, _, _, _ = head(
            carry,
            batch,
            global_batch_size=3,
            keep_cycle_logits=step.split.needs_cycle_logits,
            differential_cycles=step.split.needs_differential_cycles,
        )
        steps.append(terms)
    rows = [leaf for _, leaf in model.puzzle_embedding.pending_rows()]
    params = [p for p in model.parameters() if p.requires_grad]
    return step, params, steps, rows


@pytest.mark.parametrize(("split", "engine", "semantics"), SEMANTIC_SPLITS)
def test_mean_aggregator_reproduces_gd_for_every_split(split: str, engine: str, semantics: str) -> None:
    config = JDConfig(split=split, aggregator="mean", engine=engine, max_supervisions=3, intermediate_loss_weight=0.5, **STACK_SEMANTICS[semantics])
    step, params, steps, rows = _problem(config, attach=True, cycles=1 if engine == "autogram" else 2)
    objectives = step.split.objectives(steps)
    expected = _grad(objectives.sum(), params + rows)
    partition = split not in INTERNAL_STACKS and not (semantics == "study" and "supervisions" in split)
    if partition:  # a partition of the GD loss: the GD gradient itself
        gd_loss = sum(t.total() for t in steps)
        torch.testing.assert_close(expected, _grad(gd_loss, params + rows))

    metrics = step.backward(steps, params, rows)

    torch.testing.assert_close(flat_grads(params + rows), expected, atol=1e-6, rtol=1e-5)
    assert metrics["jd/num_objectives"] == objectives.shape[0]
    assert metrics["jd/gd_similarity"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["jd/update_norm_ratio"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["jd/skipped_nonfinite"] == 0


def test_none_split_is_a_plain_backward() -> None:
    step, params, steps, rows = _problem(JDConfig(split="none"))
    expected = _grad(steps[0].total(), params + rows)
    assert step.backward(steps, params, rows) == {}
    torch.testing.assert_close(flat_grads(params + rows), expected)
    step.finish(params)  # one process: nothing to reduce
    torch.testing.assert_close(flat_grads(params + rows), expected)


@pytest.mark.parametrize(("split", "seed"), CONFLICTING)
def test_upgrad_update_conflicts_with_no_objective(split: str, seed: int) -> None:
    step, params, steps, rows = _problem(JDConfig(split=split, max_supervisions=2), seed=seed, batch_size=4)
    inputs = params + rows
    objectives = step.split.objectives(steps)
    gradients = torch.stack([_grad(objective, inputs) for objective in objectives])  # each objective on its own
    gd_direction = gradients.sum(0)
    assert (gradients @ gd_direction).min() < 0, "the test needs a batch on which plain GD hurts an objective"

    metrics = step.backward(steps, params, rows)

    update = flat_grads(inputs)
    tolerance = 1e-5 * gradients.norm(dim=1) * update.norm()
    assert ((gradients @ update) >= -tolerance).all()
    cosine = (update @ gd_direction / (update.norm() * gd_direction.norm())).item()
    assert metrics["jd/gd_similarity"] == pytest.approx(cosine, abs=1e-5)
    assert metrics["jd/gd_similarity"] < 1 - 1e-4
    assert metrics["jd/update_norm_ratio"] == pytest.approx((update.norm() / gd_direction.norm()).item(), rel=1e-4)
    assert metrics["jd/update_alignment_min"] >= -1e-5
    assert metrics["jd/conflict_fraction"] > 0


@pytest.mark.parametrize(
    ("aggregator", "kwargs", "engine"),
    [
        ("upgrad", {}, "auto"),
        ("upgrad", {}, "autojac"),
        ("upgrad", {}, "gramian"),
        ("upgrad", {}, "autogram"),
        ("dualproj", {}, "autogram"),
        ("config", {}, "auto"),
        ("config", {}, "autojac"),
        ("trimmed_mean", {"trim_number": 1}, "auto"),
    ],
)
def test_every_engine_matches_the_reference_jacobian_path(aggregator: str, kwargs: dict, engine: str) -> None:
    config = JDConfig(split="iwrm_with_q_halt_in", aggregator=aggregator, aggregator_kwargs=kwargs, engine=engine)
    cycles = 1 if engine == "autogram" else 2
    # Reference: autojac.backward + jac_to_grad on the same objectives, times m (the step's scaling).
    _, params, steps, rows = _problem(config, cycles=cycles)
    objectives = get_split(config.split).objectives(steps)
    autojac_backward(objectives, inputs=params + rows)
    jac_to_grad(params + rows, build_aggregator(aggregator, kwargs))
    expected = objectives.shape[0] * flat_grads(params + rows)

    step, params, steps, rows = _problem(config, attach=True, cycles=cycles)
    step.backward(steps, params, rows)
    torch.testing.assert_close(flat_grads(params + rows), expected, atol=1e-5, rtol=1e-4)


def test_autogram_refuses_a_reused_module() -> None:
    step, params, steps, rows = _problem(JDConfig(split="iwrm_with_q_halt_in", engine="autogram"), attach=True, cycles=2)
    with pytest.raises(ValueError, match="module 'mix' ran 2 times.*jd.engine=gramian"):
        step.backward(steps, params, rows)


def test_engine_choice_is_checked_before_any_compute() -> None:
    with pytest.raises(ValueError, match="jd.engine=gramian needs weights computed from the Gramian.*autojac"):
        build_jd_step(JDConfig(split="iwrm_with_q_halt_in", aggregator="graddrop", engine="gramian"))
    step = build_jd_step(JDConfig(split="iwrm_with_q_halt_in", engine="autogram"))
    _, params, steps, rows = _problem(JDConfig(split="iwrm_with_q_halt_in"))
    with pytest.raises(RuntimeError, match="attach"):
        step.backward(steps, params, rows)


@pytest.mark.parametrize("engine", ["autojac", "gramian", "autogram"])
def test_rows_left_out_get_the_gd_gradient_and_params_the_jd_one(engine: str) -> None:
    config = JDConfig(split="iwrm_with_q_halt_in", include_puzzle_embedding=False, engine=engine)
    _, params, steps, rows = _problem(config, cycles=1)
    objectives = get_split(config.split).objectives(steps)
    expected_rows = _grad(objectives.sum(), rows)
    autojac_backward(objectives, inputs=params)
    jac_to_grad(params, build_aggregator("upgrad"))
    expected_params = objectives.shape[0] * flat_grads(params)

    step, params, steps, rows = _problem(config, attach=True, cycles=1)
    step.backward(steps, params, rows)
    torch.testing.assert_close(flat_grads(rows), expected_rows)
    torch.testing.assert_close(flat_grads(params), expected_params, atol=1e-5, rtol=1e-4)


def test_micro_batches_are_aggregated_separately_and_summed() -> None:
    config = JDConfig(split="iwrm_with_q_halt_out")

    def micro_batch(model: ToyRecursiveModel, table: Tensor, seed: int) -> tuple[list[LossTerms], list[Tensor]]:
        return run_steps(model, table, make_batch(B, seed=seed), global_batch_size=2 * B, keep_cycles=False)

    separate = []
    for seed in (1, 2):
        model, table = make_model()
        steps, rows = micro_batch(model, table, seed)
        build_jd_step(config).backward(steps, list(model.parameters()), rows)
        separate.append(flat_grads(list(model.parameters())))

    step = build_jd_step(config)
    model, table = make_model()
    for seed in (1, 2):
        steps, rows = micro_batch(model, table, seed)
        step.backward(steps, list(model.parameters()), rows)
    torch.testing.assert_close(flat_grads(list(model.parameters())), separate[0] + separate[1])
    assert not torch.allclose(separate[0], separate[1])


def test_nonfinite_objectives_or_gramian_are_skipped_and_counted() -> None:
    step, params, steps, rows = _problem(JDConfig(split="lm_loss_vs_q_halt_loss"))
    for p in params:
        p.grad = torch.ones_like(p)  # an earlier micro-batch's contribution
    bad = steps[0]
    nan_steps = [LossTerms(lm=bad.lm * float("nan"), q_halt=bad.q_halt, q_continue=bad.q_continue)]
    metrics = step.backward(nan_steps, params, rows)
    assert metrics == {"jd/skipped_nonfinite": 1.0, "jd/num_objectives": 2.0}
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in params)
    assert all(r.grad is None for r in rows)

    # Finite losses whose Jacobian is not (d sqrt(x)/dx at 0): the Gramian check catches it.
    _, params2, steps2, rows2 = _problem(JDConfig(split="lm_loss_vs_q_halt_loss"))
    silent = torch.sqrt((params2[0] * 0).sum())
    inf_steps = [LossTerms(lm=steps2[0].lm, q_halt=steps2[0].q_halt + silent, q_continue=steps2[0].q_continue)]
    metrics = step.backward(inf_steps, params2, rows2)
    assert metrics["jd/skipped_nonfinite"] == 2.0 and step.skipped_nonfinite == 2
    assert all(p.grad is None for p in params2)

    _, params3, steps3, rows3 = _problem(JDConfig(split="lm_loss_vs_q_halt_loss"))
    metrics = step.backward(steps3, params3, rows3)
    assert metrics["jd/skipped_nonfinite"] == 2.0 and "jd/gd_similarity" in metrics
    assert torch.isfinite(flat_grads(params3)).all() and flat_grads(params3).abs().sum() > 0


def test_n_groups_buckets_any_split_and_resumes_exactly() -> None:
    config = JDConfig(split="iwrm_pixelwise_q_halt_in", n_groups=5, seed=7)  # m = B*S = 12 -> 5 uneven buckets
    step, params, steps, rows = _problem(config)
    state = step.state_dict()
    metrics = step.backward(steps, params, rows)
    assert metrics["jd/num_objectives"] == 5
    first = flat_grads(params + rows)

    resumed, params, steps, rows = _problem(config)
    resumed.load_state_dict(state)
    resumed.backward(steps, params, rows)
    torch.testing.assert_close(flat_grads(params + rows), first)

    mean_step, params, steps, rows = _problem(config.model_copy(update={"aggregator": "mean"}))
    expected = _grad(sum(t.total() for t in steps), params + rows)
    mean_step.backward(steps, params, rows)
    torch.testing.assert_close(flat_grads(params + rows), expected, atol=1e-6, rtol=1e-5)

    too_many, params, steps, rows = _problem(config.model_copy(update={"n_groups": 13}))
    with pytest.raises(ValueError, match="n_groups=13 is larger than.*m=12"):
        too_many.backward(steps, params, rows)


def test_aggregator_sized_for_another_m_is_a_clear_error() -> None:
    step, params, steps, rows = _problem(JDConfig(split="iwrm_with_q_halt_in", aggregator="constant", aggregator_kwargs={"weights": [1.0, 2.0]}))
    with pytest.raises(ValueError, match="sized for 2 objectives.*m=3"):
        step.backward(steps, params, rows)


def test_diagnostics_can_be_turned_off() -> None:
    step, params, steps, rows = _problem(JDConfig(split="iwrm_with_q_halt_in", diagnostics=False))
    metrics = step.backward(steps, params, rows)
    assert set(metrics) == {"jd/skipped_nonfinite", "jd/num_objectives"}


@pytest.mark.parametrize("split", ["iwrm_with_q_halt_in", "stack_internal_losses", "stack_supervisions_and_iwrm", "pixelwise_q_halt_out"])
def test_tiny_trm_mean_reproduces_gd(split: str) -> None:
    step, params, steps, rows = _tiny_trm_steps(split)
    objectives = step.split.objectives(steps)
    expected = _grad(objectives.sum(), params + rows)
    metrics = step.backward(steps, params, rows)
    torch.testing.assert_close(flat_grads(params + rows), expected, atol=1e-6, rtol=1e-4)
    assert metrics["jd/gd_similarity"] == pytest.approx(1.0, abs=1e-5)
    assert flat_grads(rows).abs().sum() > 0


def test_tiny_trm_autogram_is_refused_with_a_clear_error() -> None:
    step, params, steps, rows = _tiny_trm_steps("iwrm_with_q_halt_in", engine="autogram", aggregator="upgrad")
    with pytest.raises(ValueError, match="ran 2 times.*jd.engine=gramian"):
        step.backward(steps, params, rows)


@pytest.mark.parametrize("engine", ["autojac"])
def test_tiny_trm_engines_agree_with_gramian_engine(engine: str) -> None:
    step, params, steps, rows = _tiny_trm_steps("iwrm_with_q_halt_in", engine="gramian", aggregator="upgrad")
    step.backward(steps, params, rows)
    expected = flat_grads(params + rows)
    step, params, steps, rows = _tiny_trm_steps("iwrm_with_q_halt_in", engine=engine, aggregator="upgrad")
    step.backward(steps, params, rows)
    torch.testing.assert_close(flat_grads(params + rows), expected, atol=1e-5, rtol=1e-4)


def _notes(batch_size: int, **jd: object) -> list[str]:
    step = build_jd_step(JDConfig(**jd), halt_max_steps=3)  # type: ignore[arg-type]
    return step.prepare(batch_size=batch_size, seq_len=16, H_cycles=2, halt_max_steps=3, grad_accum_steps=1, device=torch.device("cpu"))


def test_every_engine_says_what_a_large_m_costs_before_training() -> None:
    (per_sample,) = _notes(128, split="iwrm_with_q_halt_in", aggregator="upgrad", engine="per_sample")
    assert "m=128" in per_sample and "one backward" in per_sample and "128 quadratic program(s) of size 128" in per_sample
    (gramian,) = _notes(128, split="iwrm_with_q_halt_in", aggregator="upgrad", engine="gramian")
    assert "about 128 backward passes" in gramian and "jd.n_groups=2" in gramian
    assert _notes(64, split="iwrm_with_q_halt_in", aggregator="upgrad", engine="per_sample") == []  # cheap: no word
    assert _notes(128, split="iwrm_with_q_halt_in", aggregator="mean", engine="per_sample") == []  # no programs to solve


def test_a_stateful_scalarizer_on_per_instance_objectives_is_explained() -> None:
    for name in ("uw", "famo", "dwa"):
        (note,) = _notes(8, split="iwrm_with_q_halt_in", scalarizer=name)
        assert f"jd.scalarizer={name} keeps state per objective" in note and "batch slot" in note
    assert _notes(8, split="stack_supervisions", supervision_loop="carry", scalarizer="uw") == []  # fixed objectives
    assert _notes(8, split="iwrm_with_q_halt_in", scalarizer="mean") == []  # stateless
