"""Answers at any depth (``--steps``/``--halt``) and the puzzle-ID evaluation (``--puzzle-ids``) of
``python -m analysis.evaluate``, on real tiny runs (the fixtures of tests/helpers/eval_and_visualize.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from analysis.evaluate import main as evaluate_main
from tests.helpers.eval_and_visualize import evaluate_cli, last_eval
from training.checkpoint import list_checkpoints, load_checkpoint


def evaluated(out: Path, *args: str) -> dict:
    assert evaluate_cli(*args, "--out", str(out)) == 0
    return json.loads((out / "metrics.json").read_text())


def one_line_error(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    capsys.readouterr()
    assert evaluate_main([*args, "--device", "cpu", "--quiet"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_depth_at_halt_max_steps_equals_the_ordinary_evaluation(runs: dict[str, Path], tmp_path: Path) -> None:
    run_dir = runs["plain"]  # halt_max_steps=3
    record = evaluated(tmp_path / "depth", str(run_dir), "--steps", "1,2,3,6", "--halt", "max,q")
    depth, logged = record["depth"], last_eval(run_dir)
    assert record["halt_max_steps"] == 3 and set(depth) == {"max", "q"} and set(depth["max"]) == {"1", "2", "3", "6"}
    for key in ("eval/exact_accuracy", "eval/exact_accuracy_ci_low", "eval/exact_accuracy_ci_high"):
        assert depth["max"]["3"][key] == pytest.approx(logged[key], abs=1e-12), key
    for budget in ("1", "2", "3", "6"):
        assert depth["max"][budget]["mean_steps"] == float(budget)
        assert 1.0 <= depth["q"][budget]["mean_steps"] <= float(budget)
    assert record["halting"]["best_fixed_depth"]["steps"] in (1, 2, 3, 6)
    assert (tmp_path / "depth" / "depth.png").stat().st_size > 0


def test_a_q_head_that_always_halts_uses_one_step(runs: dict[str, Path], tmp_path: Path) -> None:
    state = load_checkpoint(list_checkpoints(runs["plain"])[-1])
    state["model"]["core.q_head.bias"] = torch.tensor([10.0, -10.0])  # q_halt >> q_continue for every sample
    halting = tmp_path / "halting.pt"
    torch.save(state, halting)
    record = evaluated(tmp_path / "out", str(halting), "--steps", "1,3", "--halt", "max,q")
    for budget in ("1", "3"):
        assert record["depth"]["q"][budget]["mean_steps"] == 1.0
        assert record["depth"]["q"][budget]["eval/exact_accuracy"] == record["depth"]["max"]["1"]["eval/exact_accuracy"]
    assert record["halting"]["q_at_budget"]["3"]["mean_steps"] == 1.0


def test_arc_voting_works_at_every_depth(arc_run: Path, tmp_path: Path) -> None:
    ordinary = evaluated(tmp_path / "plain", str(arc_run))["metrics"]
    depth = evaluated(tmp_path / "depth", str(arc_run), "--steps", "1,3", "--halt", "max,q")["depth"]
    for rule in ("max", "q"):
        for budget in ("1", "3"):
            assert {"ARC/pass@1", "ARC/pass@2", "eval/exact_accuracy"} <= set(depth[rule][budget])
    for key in ("ARC/pass@1", "ARC/pass@2", "eval/exact_accuracy"):
        assert depth["max"]["3"][key] == ordinary[key], key


def test_puzzle_identifiers_true_blank_and_random_side_by_side(arc_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    record = evaluated(tmp_path / "ids", str(arc_run), "--puzzle-ids", "true,blank,random")
    by_variant = record["puzzle_ids"]
    assert list(by_variant) == ["true", "blank", "random"] and record["metrics"] == by_variant["true"]
    assert by_variant["true"] == evaluated(tmp_path / "plain", str(arc_run))["metrics"]
    assert by_variant["blank"]["eval/lm_loss"] != by_variant["true"]["eval/lm_loss"], "the identifier reaches the model"
    assert by_variant["random"]["eval/lm_loss"] != by_variant["true"]["eval/lm_loss"]
    assert all("eval/exact_accuracy_ci_low" in row and "ARC/pass@2" in row for row in by_variant.values())
    table = capsys.readouterr().out
    assert "puzzle ids" in table and "blank" in table and "random" in table


def test_bad_depth_and_identifier_arguments_are_one_line_errors(runs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = str(runs["plain"])
    assert "--steps '0,2'" in one_line_error(capsys, run_dir, "--steps", "0,2")
    assert "accepted: comma-separated ['max', 'q']" in one_line_error(capsys, run_dir, "--steps", "2", "--halt", "sometimes")
    assert "give --steps too" in one_line_error(capsys, run_dir, "--halt", "q")
    assert "one of them" in one_line_error(capsys, run_dir, "--steps", "2", "--puzzle-ids", "true")
    # The Sudoku runs have one (blank) identifier: another puzzle's cannot be drawn.
    assert "at least two puzzles" in one_line_error(capsys, run_dir, "--puzzle-ids", "true,random")
    assert "unknown ['none']" in one_line_error(capsys, run_dir, "--puzzle-ids", "none")


def test_training_logs_the_depth_curve_at_its_cadence(sudoku_data: Path, tmp_path: Path) -> None:
    from pretrain import run
    from tests.conftest import compose, tiny_overrides
    from tests.helpers.reliability import read_records

    overrides = tiny_overrides(
        sudoku_data, tmp_path, max_steps=6, eval_steps="[2,4]", lr=3e-3, eval_depths="[1,3,6]", checkpoint_best="eval/exact_accuracy@6"
    )
    summary = run(compose(overrides + ["run_name=every"]))
    evaluations = [record for record in read_records(Path(summary["run_dir"])) if "eval/count" in record]
    assert len(evaluations) == 3 and summary["best"]["metric"] == "eval/exact_accuracy@6"
    for record in evaluations:
        assert record["eval/exact_accuracy@3"] == record["eval/exact_accuracy"], "halt_max_steps=3 is the ordinary evaluation"
        assert all(1.0 <= record[f"eval/steps@{k}/q"] <= k for k in (1, 3, 6))
    sparse = run(compose(overrides[:-1] + ["run_name=sparse", "eval_depths_every=2", "checkpoint_best=true"]))
    logged = [("eval/exact_accuracy@6" in record) for record in read_records(Path(sparse["run_dir"])) if "eval/count" in record]
    assert logged == [True, False, True]
