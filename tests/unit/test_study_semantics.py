"""The JD study's experiments as it ran them: its stacks' objectives, hard-example sampling, frozen weights,
fine-tuning, search sweeps.

The objectives are checked against direct computations from the model's per-cycle / per-step logits,
written here from the study's formulas (a stablemax cross-entropy of our own, not the code under test).

This file holds the unit tests; the others are in tests/integration/test_study_semantics.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

from dataset.puzzle_dataset import PuzzleDataset
from jd.config import JDConfig
from jd.step import build_jd_step
from models.loss_terms import IGNORE_LABEL_ID
from models.losses import ACTLossHead
from models.registry import build_model
from pretrain import run
from tests.conftest import FIXTURES, compose, tiny_arch, tiny_overrides, tiny_trm_batch
from training.distributed import DistInfo
from training.hard_sampling import HardExampleSampler
from training.trainer import Trainer

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


FIXTURE = FIXTURES / "reference"


W = 0.3  # jd.intermediate_loss_weight


def stablemax_ce(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-token stablemax cross-entropy, 0 on ignored labels: -log(s(x_y) / sum s(x)), s(x) = x+1 | 1/(1-x)."""
    x = logits.double()
    s = torch.where(x < 0, 1 / (1 - x), x + 1)
    valid = labels != IGNORE_LABEL_ID
    picked = torch.gather(s, -1, torch.where(valid, labels, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, -torch.log(picked / s.sum(-1)), 0.0).float()


def _setup(H: int = 3, halt_max_steps: int = 3, **arch: object):
    torch.manual_seed(0)
    model = build_model(
        tiny_arch(H_cycles=H, halt_max_steps=halt_max_steps, halt_exploration_prob=0.0, **arch),
        seq_len=16,
        vocab_size=11,
        num_puzzle_identifiers=4,
        device=torch.device("cpu"),
    )
    batch = tiny_trm_batch()
    return model, ACTLossHead(model), batch


def _trainer(data: Path, tmp_path: Path, **extra: object) -> Trainer:
    return Trainer(compose(tiny_overrides(data, tmp_path, **extra)), CPU)


def _one_cell_puzzles(path: Path) -> Path:
    """Puzzles scored on one cell of two possible tokens (a fresh model is right half the time), 8 groups
    of 3 puzzles, each puzzle its own identifier: hard-example sampling has something to tell apart."""
    from dataset.common import DatasetMetadata, SplitArrays, write_dataset

    rng = np.random.default_rng(0)
    puzzles, per_puzzle = 24, 2
    inputs = rng.integers(1, 3, size=(puzzles * per_puzzle, 16))
    labels = np.zeros_like(inputs)
    labels[:, 0] = inputs[:, 0]
    arrays = SplitArrays(inputs, labels, np.arange(1, puzzles + 1), np.arange(0, puzzles * per_puzzle + 1, per_puzzle), np.arange(0, puzzles + 1, 3))
    metadata = DatasetMetadata(kind="unknown", seq_len=16, vocab_size=3, num_puzzle_identifiers=puzzles + 1, grid_shape=(4, 4))
    return write_dataset(path, metadata, {"train": arrays, "test": arrays}, ["<blank>"] + [f"p{i}" for i in range(puzzles)])


@pytest.mark.parametrize("name, m", [("stack_internal_losses", 4), ("stack_internal_losses_only", 3), ("stack_internal_and_sum", 1)])
def test_differential_internal_stacks_follow_the_study(name: str, m: int) -> None:
    """m = H + 1 / H / 1 from ``logits_i - logits_{i-1}.detach()`` (not per-token normalised), no halting term."""
    model, head, batch = _setup(H=3)
    split = build_jd_step(JDConfig(split=name, intermediate_loss_weight=W)).split
    _, terms, _, outputs, _ = head(head.initial_carry(batch), batch, global_batch_size=6, keep_cycle_logits=True, differential_cycles=True)
    logits, labels = outputs["cycle_logits"], batch["labels"]
    counts = (labels != IGNORE_LABEL_ID).sum(-1, keepdim=True)
    final = (stablemax_ce(logits[-1], labels) / counts).sum() / 6
    previous = [torch.zeros_like(logits[0])] + [c.detach() for c in logits[:-1]]
    d = [stablemax_ce(c - p, labels).sum() / 6 for c, p in zip(logits, previous)]
    expected = {
        "stack_internal_losses": torch.stack([final] + [W * x for x in d]),
        "stack_internal_losses_only": torch.stack([W * x for x in d]),
        "stack_internal_and_sum": (final + W * sum(d)).reshape(1),
    }[name]
    objectives = split.objectives([terms])
    assert objectives.shape == (m,) == (split.num_objectives(batch_size=3, seq_len=16, H_cycles=3),)
    torch.testing.assert_close(objectives, expected, rtol=1e-5, atol=1e-7)
    # The differential of cycle i reaches only cycle i's graph (each cycle starts from a detached state).
    model.zero_grad()
    (objectives[-1] if name != "stack_internal_and_sum" else objectives[0]).backward()
    assert model.core.lm_head.weight.grad.abs().sum() > 0


def test_plain_internal_stack_keeps_todays_objectives() -> None:
    _, head, batch = _setup(H=3)
    split = build_jd_step(JDConfig(split="stack_internal_losses", internal_loss="plain", intermediate_loss_weight=W)).split
    _, terms, _, _, _ = head(head.initial_carry(batch), batch, global_batch_size=6, keep_cycle_logits=True)
    cycles = terms.internal_lm
    expected = torch.stack([W * cycles[0].sum(), W * cycles[1].sum(), terms.lm.sum()]) + terms.halting().sum() / 3
    torch.testing.assert_close(split.objectives([terms]), expected)


@pytest.mark.parametrize(
    "name", ["stack_supervisions", "stack_supervisions_and_iwrm", "stack_supervisions_and_pixelwise", "stack_supervisions_and_sum"]
)
def test_same_batch_supervision_stacks_follow_the_study(name: str) -> None:
    """One batch, fresh carry, steps until all halted; each step's LM loss / halt_max_steps, no halting term."""
    halt_max_steps = 4
    _, head, batch = _setup(H=2, halt_max_steps=halt_max_steps)
    split = build_jd_step(JDConfig(split=name, max_supervisions=3), halt_max_steps=halt_max_steps).split
    carry, steps, logits = head.initial_carry(batch), [], []
    for _ in range(split.supervision_steps(halt_max_steps)):
        carry, terms, _, outputs, done = head(carry, batch, global_batch_size=6)
        steps.append(terms)
        logits.append(outputs["logits"])
        if done:
            break
    counts = (batch["labels"] != IGNORE_LABEL_ID).sum(-1, keepdim=True)
    per_token = [stablemax_ce(x, batch["labels"]) / counts / 6 / halt_max_steps for x in logits]  # [B, S] per step
    expected = {
        "stack_supervisions": torch.stack([t.sum() for t in per_token]),
        "stack_supervisions_and_iwrm": torch.cat([t.sum(1) for t in per_token]),
        "stack_supervisions_and_pixelwise": torch.cat([t.sum(0) for t in per_token]),
        "stack_supervisions_and_sum": torch.stack([t.sum() for t in per_token]).sum().reshape(1),
    }[name]
    assert len(steps) == 3  # an untrained Q-head never halts before halt_max_steps: K = min(max_supervisions, h)
    torch.testing.assert_close(split.objectives(steps), expected, rtol=1e-5, atol=1e-7)


def test_the_same_batch_loop_reads_one_batch_and_stops_when_all_halted(sudoku_data: Path, tmp_path: Path) -> None:
    trainer = _trainer(
        sudoku_data,
        tmp_path,
        **{"jd.split": "stack_supervisions", "jd.max_supervisions": 3, "arch.halt_max_steps": 3, "arch.halt_exploration_prob": 0.0, "run_name": "sb"},
    )
    assert trainer.supervision.batches_per_step == 1 and trainer.supervision.supervision_steps == 3
    metrics = trainer.step()
    assert metrics["jd/num_objectives"] == 3 and trainer.progress.batch_in_iteration == 1  # one batch for three steps
    carry = trainer.supervision.carries[0]  # every sample halted: the next step loads its own batch whole (a fresh start)
    assert carry is not None and bool(carry.halted.all())
    with torch.no_grad():
        trainer.model.core.q_head.bias.fill_(10.0)  # every sample halts at its first step
    metrics = trainer.step()
    assert metrics["jd/num_objectives"] == 1 and metrics["train/halted_count"] == 16
    carry_run = _trainer(
        sudoku_data,
        tmp_path,
        **{"jd.split": "stack_supervisions", "jd.supervision_loop": "carry", "jd.max_supervisions": 3, "arch.halt_max_steps": 3, "run_name": "carry"},
    )
    assert carry_run.supervision.batches_per_step == 3
    carry_run.step()
    assert carry_run.progress.batch_in_iteration == 3


def test_pretrain_logs_h_plus_one_objectives_for_the_studys_internal_stack(sudoku_data: Path, tmp_path: Path) -> None:
    """``python pretrain.py jd.split=stack_internal_losses jd.aggregator=upgrad max_steps=3``, tiny."""
    summary = run(
        compose(
            tiny_overrides(
                sudoku_data, tmp_path, max_steps=3, run_name="internal", **{"jd.split": "stack_internal_losses", "jd.aggregator": "upgrad"}
            )
        )
    )
    records = [json.loads(line) for line in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert [r["jd/num_objectives"] for r in records if "jd/num_objectives" in r] == [3.0, 3.0, 3.0]  # H_cycles=2 -> m=3


def test_weighted_choice_draws_by_weight_and_never_a_zero_weight_puzzle() -> None:
    data = PuzzleDataset([FIXTURE / "arc"], "train", 4)
    weights = np.ones(len(data.identifiers))
    groups = data._group_indices
    favoured = {int(groups[g]) for g in range(len(groups) - 1)}  # each group's first puzzle
    for puzzle in range(len(data._puzzle_identifiers)):
        if puzzle not in favoured:
            weights[data._puzzle_identifiers[puzzle]] = 0.0
    data.set_puzzle_weights(weights)
    rng = np.random.default_rng(0)
    for _ in range(20):
        chosen = data._choose_puzzles(groups[:-1], np.diff(groups), rng.random(len(groups) - 1))
        assert set(chosen.tolist()) == favoured
    weights[:] = 1.0
    data.set_puzzle_weights(weights)
    uniform = PuzzleDataset([FIXTURE / "arc"], "train", 4)
    assert np.array_equal(data._train_plan(3), uniform._train_plan(3))  # equal weights: the uniform plan, draw for draw


def test_custom_sampling_counts_halted_samples_and_reweights_the_next_iteration(tmp_path: Path) -> None:
    data = _one_cell_puzzles(tmp_path / "cells")
    trainer = _trainer(
        data, tmp_path, custom_sampling=True, global_batch_size=4, epochs=2, eval_interval=1, run_name="hard", **{"arch.halt_max_steps": 1}
    )
    halted = exact = 0
    for _ in range(trainer.data.train.num_train_batches(0)):
        metrics = trainer.step()
        halted += metrics["train/halted_count"]
        exact += metrics.get("train/exact_accuracy", 0.0) * metrics["train/halted_count"]
        assert metrics["train/sampling_weight_min"] == 1.0  # the first iteration samples uniformly
    metrics = trainer.step()  # crosses into iteration 1: the weights come from iteration 0's counts
    seen, correct = trainer.data.sampler.boundary
    assert seen.sum() == halted and correct.sum() == pytest.approx(exact) and 0 < exact < halted
    expected = 1 - correct.numpy() / (seen.numpy() + 1)
    weights = trainer.data.train.puzzle_weights()
    np.testing.assert_allclose(weights, expected[trainer.data.train._puzzle_identifiers])
    assert weights.min() < 1.0 and metrics["train/sampling_weight_min"] == weights.min()


def test_hard_example_counts_round_trip_and_refuse_another_dataset() -> None:
    sampler = HardExampleSampler(4, torch.device("cpu"), 1)
    sampler.observe(torch.tensor([1, 2, 2]), torch.tensor([True, True, True]), torch.tensor([True, True, False]))
    sampler.end_iteration()
    other = HardExampleSampler(4, torch.device("cpu"), 1)
    other.load_state_dict(sampler.state_dict())
    assert np.array_equal(other.identifier_weights(), sampler.identifier_weights())
    with pytest.raises(ValueError, match="for 4 identifiers, the data has 5"):
        HardExampleSampler(5, torch.device("cpu"), 1).load_state_dict(sampler.state_dict())


@pytest.mark.parametrize("split", ["none", "iwrm_with_q_halt_in"])
def test_freeze_weights_trains_the_puzzle_embeddings_only(sudoku_data: Path, tmp_path: Path, split: str) -> None:
    trainer = _trainer(sudoku_data, tmp_path, freeze_weights=True, run_name=f"frozen-{split}", **{"jd.split": split, "puzzle_emb_lr": 0.1})
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    for _ in range(3):
        trainer.step()
    after = trainer.model.state_dict()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == ["puzzle_embedding.weights"]


def test_freeze_weights_without_a_puzzle_embedding_is_refused(sudoku_data: Path, tmp_path: Path) -> None:
    from training.config import ConfigError

    with pytest.raises(ConfigError, match="freeze_weights=true trains the puzzle embeddings only"):
        _trainer(sudoku_data, tmp_path, freeze_weights=True, run_name="nothing", **{"arch.puzzle_emb_ndim": 0})
