"""Loss-weighting baselines (``jd.scalarizer``): by name, validated, exact, one backward, and trainable.

This file holds the unit tests; the others are in tests/integration/test_jd_scalarizers.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from jd.config import JDConfig
from jd.scalarizers import ScalarizerStep, scalarizer_names
from jd.splits import method_of
from jd.step import build_jd_step
from pretrain import run
from tests.conftest import compose, tiny_overrides
from tests.unit.test_jd_step import SEQ, flat_grads, make_batch, make_model, run_steps

TORCHJD_SCALARIZERS = {"COSMOS", "Constant", "DWA", "FAMO", "GeometricMean", "IMTLL", "Mean", "PBI", "Random", "STCH", "Sum", "UW"}


def _toy_step(scalarizer: str, split: str = "iwrm_with_q_halt_in", **kwargs: object):
    step = build_jd_step(JDConfig(split=split, scalarizer=scalarizer, scalarizer_kwargs=kwargs or None))
    step.build_scalarizer(
        step.split.global_num_objectives(batch_size=4, seq_len=SEQ, H_cycles=2, halt_max_steps=1, world_size=1, n_groups=None), torch.device("cpu")
    )
    model, table = make_model(cycles=2, seed=0)
    steps, rows = run_steps(model, table, make_batch(4, seed=2), global_batch_size=4, keep_cycles=False)
    return step, list(model.parameters()), steps, rows


def test_every_scalarizer_of_torchjd_is_reachable_by_name() -> None:
    from torchjd import scalarization

    assert {n for n in dir(scalarization) if n[0].isupper() and n != "Scalarizer"} == TORCHJD_SCALARIZERS
    assert len(scalarizer_names()) == len(TORCHJD_SCALARIZERS)
    arguments = {
        "constant": {"weights": [1.0, 2.0, 3.0]},
        "stch": {"mu": 0.5},
        "pbi": {"theta": 1.0, "weights": [1.0, 1.0, 1.0]},
        "cosmos": {"lambda_": 0.1, "weights": [1.0, 1.0, 1.0]},
    }
    for name in scalarizer_names():
        step = ScalarizerStep(name, arguments.get(name, {}), num_objectives=3)
        assert step.coefficients(torch.tensor([0.5, 1.0, 2.0])).shape == (3,), name


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scalarizer": "uwx"}, r"unknown jd.scalarizer 'uwx' \(did you mean uw\?\); accepted: constant, cosmos, dwa, famo"),
        (
            {"scalarizer": "famo", "scalarizer_kwargs": {"learning_rate": 1.0}},
            r"unknown jd.scalarizer_kwargs \['learning_rate'\]; accepted: \['lr', 'min_losses', 'weight_decay'\]",
        ),
        ({"scalarizer": "stch"}, r"needs jd.scalarizer_kwargs \['mu'\]"),
    ],
)
def test_bad_scalarizers_are_refused_with_the_accepted_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_jd_step(JDConfig(split="iwrm_with_q_halt_in", **kwargs))


def test_an_aggregator_and_a_scalarizer_together_are_refused() -> None:
    with pytest.raises(ValidationError, match="give one"):
        JDConfig(split="iwrm_with_q_halt_in", aggregator="upgrad", scalarizer="famo")
    assert method_of(JDConfig(split="iwrm_with_q_halt_in", scalarizer="famo")) == "scalarizer:famo"
    assert method_of(JDConfig(split="iwrm_with_q_halt_in")) == "aggregator:upgrad"


def test_sum_is_gradient_descent_and_weights_are_the_scalarizers_gradient() -> None:
    step, params, steps, rows = _toy_step("sum")
    expected = torch.autograd.grad(steps[0].total(), params + rows, retain_graph=True)
    metrics = step.backward(steps, params, rows)
    torch.testing.assert_close(flat_grads(params + rows), torch.cat([g.reshape(-1) for g in expected]))
    assert metrics["jd/scalarizer_weights_min"] == metrics["jd/scalarizer_weights_max"] == 1.0
    # FAMO: weights c = dS/dl = z_i / (l_i * sum_j z_j / l_j) with z = softmax(0) (uniform) at the start.
    step, params, steps, rows = _toy_step("famo")
    values = step.split.objectives(steps).detach()
    step.backward(steps, params, rows)
    expected_weights = (1 / values) / (1 / values).sum()
    coefficients = step.scalarizer.coefficients(values)
    torch.testing.assert_close(coefficients, expected_weights)


@pytest.mark.parametrize("name", ["famo", "uw", "dwa", "stch", "imtl_l", "geometric_mean"])
def test_pretrain_trains_with_each_stateful_or_nonlinear_scalarizer(name: str, sudoku_data: Path, tmp_path: Path) -> None:
    """``python pretrain.py jd.split=iwrm_with_q_halt_in jd.scalarizer=NAME max_steps=5`` (tiny)."""
    extra = {"jd.scalarizer_kwargs": "{mu: 0.5}"} if name == "stch" else {}
    summary = run(
        compose(
            tiny_overrides(
                sudoku_data,
                tmp_path,
                max_steps=5,
                run_name=name,
                eval_interval="null",
                **{"jd.split": "iwrm_with_q_halt_in", "jd.scalarizer": name, **extra},
            )
        )
    )
    assert summary["status"] == "finished" and summary["final_step"] == 5
    records = [json.loads(line) for line in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train/lm_loss" in r]
    assert len(train) == 5 and all({"jd/scalarizer_weights_min", "jd/scalarizer_weights_entropy"} <= set(r) for r in train)
    if name == "uw":  # the log-variances learn
        state = torch.load(summary["checkpoint"], weights_only=True)["jd"]["scalarizer"]["module"]
        assert state["log_var"].abs().sum() > 0
