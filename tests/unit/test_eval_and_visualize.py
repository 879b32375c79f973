"""Standalone evaluation (``python -m analysis.evaluate``) and the recursion visualiser, on real tiny runs.

This file holds the unit tests; the others are in tests/integration/test_eval_and_visualize.py, tests/distributed/test_eval_and_visualize.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from analysis.evaluate import load_for_evaluation
from analysis.visualize_recursion import (
    ARC_COLOURS,
    load_example,
    token_colours,
    trace_recursion,
)
from analysis.visualize_recursion import main as visualize_main
from dataset.puzzle_dataset import PuzzleDataset
from tests.conftest import FIXTURES
from tests.helpers.eval_and_visualize import evaluate_cli, last_eval  # noqa: F401 - pytest fixtures


def standalone_dirs(run_dir: Path) -> set[Path]:
    return set((run_dir / "eval").glob("standalone-*"))


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def _sudoku_6x6(tmp_path: Path) -> Path:
    from dataset.build_sudoku_dataset import build_generated_sudoku

    return build_generated_sudoku(tmp_path / "sudoku6", size=6, num_train=4, num_test=2, min_givens=30, max_givens=32, seed=0, progress=False)


def _wider_vocabulary(sudoku_data: Path, tmp_path: Path) -> Path:
    copy = Path(shutil.copytree(sudoku_data, tmp_path / "vocab12"))
    metadata = json.loads((copy / "metadata.json").read_text())
    metadata["vocab_size"] = 12
    (copy / "metadata.json").write_text(json.dumps(metadata))
    return copy


@pytest.mark.parametrize("name", ["ema", "plain"])
def test_standalone_metrics_equal_the_trainers_final_evaluation(runs: dict[str, Path], name: str) -> None:
    run_dir = runs[name]
    before = standalone_dirs(run_dir)
    assert evaluate_cli(str(run_dir)) == 0
    (out,) = standalone_dirs(run_dir) - before
    record = json.loads((out / "metrics.json").read_text())
    logged = last_eval(run_dir)
    assert record["ema"] is (name == "ema")
    assert record["step"] == json.loads((run_dir / "summary.json").read_text())["final_step"]
    assert out.name.startswith(f"standalone-step_{record['step']:08d}")
    evaluated = {key: value for key, value in logged.items() if not key.startswith("raw/")}
    assert set(record["metrics"]) == set(evaluated)
    for key, value in evaluated.items():
        assert record["metrics"][key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    live = {key.removeprefix("raw/"): value for key, value in logged.items() if key.startswith("raw/")}
    assert bool(live) is (name == "ema"), "a run with EMA evaluates its live weights too"
    if live:
        assert evaluate_cli(str(run_dir), "--no-ema", "--out", str(run_dir / "eval" / "live-check")) == 0
        record = json.loads((run_dir / "eval" / "live-check" / "metrics.json").read_text())
        for key, value in live.items():
            assert record["metrics"][key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_ema_weights_are_the_default_and_can_be_switched_off(runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert evaluate_cli(str(runs["ema"]), "--no-ema", "--out", str(tmp_path / "live")) == 0
    live = json.loads((tmp_path / "live" / "metrics.json").read_text())
    assert live["ema"] is False
    assert live["metrics"]["eval/lm_loss"] != pytest.approx(last_eval(runs["ema"])["eval/lm_loss"], rel=1e-6)

    capsys.readouterr()
    assert evaluate_cli(str(runs["plain"]), "--ema", "--out", str(tmp_path / "none")) == 2
    assert "no EMA weights" in one_line_error(capsys)
    assert not (tmp_path / "none").exists()


def test_batch_size_and_max_batches(runs: dict[str, Path], tmp_path: Path) -> None:
    assert evaluate_cli(str(runs["plain"]), "--batch-size", "8", "--max-batches", "2", "--out", str(tmp_path / "two")) == 0
    record = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert record["batch_size"] == 8 and record["max_batches"] == 2
    assert record["metrics"]["eval/count"] == 16  # two batches of 8 of the 24 test examples


def test_results_are_never_overwritten(runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = runs["plain"]
    first_before = standalone_dirs(run_dir)
    assert evaluate_cli(str(run_dir)) == 0
    (first,) = standalone_dirs(run_dir) - first_before
    content = (first / "metrics.json").read_text()
    assert evaluate_cli(str(run_dir)) == 0
    (second,) = standalone_dirs(run_dir) - first_before - {first}
    assert second.name != first.name and (first / "metrics.json").read_text() == content

    out = tmp_path / "results"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    capsys.readouterr()
    assert evaluate_cli(str(run_dir), "--out", str(out)) == 2
    assert "--overwrite" in one_line_error(capsys)
    assert (out / "metrics.json").read_text() == "{}"
    assert evaluate_cli(str(run_dir), "--out", str(out), "--overwrite") == 0
    assert "metrics" in json.loads((out / "metrics.json").read_text())


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing", "no such checkpoint file or run directory"),
        ("garbage", "unreadable checkpoint"),
        ("empty_run_dir", "no checkpoint"),
        ("sudoku6", "seq_len 36 (the checkpoint's model takes 16)"),
        ("vocab12", "vocab_size 12 (the checkpoint's model takes 11)"),
        ("arc", "seq_len 900"),
        ("bad_evaluator", "accepted"),
        ("arc_evaluator_on_sudoku", "needs an ARC dataset"),
        ("bad_max_batches", "--max-batches"),
        ("out_is_a_file", "is a file"),
    ],
)
def test_bad_input_stops_with_one_line_and_status_2(
    case: str, expected: str, runs: dict[str, Path], sudoku_data: Path, arc_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = str(runs["plain"])
    extra: list[str] = []
    if case == "missing":
        checkpoint = str(tmp_path / "nowhere")
    elif case == "garbage":
        (tmp_path / "step_00000001.pt").write_bytes(b"not a checkpoint")
        checkpoint = str(tmp_path / "step_00000001.pt")
    elif case == "empty_run_dir":
        checkpoint = str(tmp_path)
    elif case == "sudoku6":
        extra = ["--data", str(_sudoku_6x6(tmp_path))]
    elif case == "vocab12":
        extra = ["--data", str(_wider_vocabulary(sudoku_data, tmp_path))]
    elif case == "arc":
        extra = ["--data", str(arc_data)]
    elif case == "bad_evaluator":
        extra = ["--evaluators", "exact,bleu"]
    elif case == "arc_evaluator_on_sudoku":
        extra = ["--evaluators", "arc"]
    elif case == "bad_max_batches":
        extra = ["--max-batches", "0"]
    elif case == "out_is_a_file":
        (tmp_path / "file").write_text("")
        extra = ["--out", str(tmp_path / "file")]
    before = standalone_dirs(runs["plain"])
    capsys.readouterr()
    assert evaluate_cli(checkpoint, *extra) == 2
    message = one_line_error(capsys)
    assert expected in message
    assert standalone_dirs(runs["plain"]) == before
    if case == "arc":  # every size that does not fit is named
        assert "vocab_size 12" in message and "num_puzzle_identifiers 9" in message


def test_example_loading_matches_the_loader(sudoku_data: Path, arc_data: Path) -> None:
    for path in (sudoku_data, arc_data):
        data = PuzzleDataset([path], "test", 64)
        batch = next(iter(data.test_batches()))
        for index in (0, data.total_examples - 1):
            example = load_example(path, "test", index)
            for key in ("inputs", "labels", "puzzle_identifiers", "example_index"):
                assert torch.equal(example.batch[key][0], batch[key][index]), (path.name, key)


def test_trace_equals_the_models_step_by_step_outputs(runs: dict[str, Path], sudoku_data: Path) -> None:
    loaded = load_for_evaluation(str(runs["ema"]), "cpu")  # plain strings, as in the README
    data = PuzzleDataset([sudoku_data], "test", 24)
    batch = next(iter(data.test_batches()))
    carry = loaded.loss_head.initial_carry(batch)
    per_step = []
    with torch.no_grad():
        for _ in range(loaded.config.arch.halt_max_steps):
            carry, _, _, outputs, _ = loaded.loss_head(carry, batch, global_batch_size=24)
            per_step.append((outputs["preds"].clone(), torch.sigmoid(outputs["q_halt_logits"].double())))
    for index in (0, 5, 23):
        steps = trace_recursion(loaded.model, load_example(sudoku_data, "test", index).batch)
        assert [step.step for step in steps] == list(range(1, loaded.config.arch.halt_max_steps + 1))
        labels = batch["labels"][index]
        for step, (preds, q_halt) in zip(steps, per_step):
            assert np.array_equal(step.tokens, preds[index].numpy()), (index, step.step)
            assert step.q_halt_probability == pytest.approx(float(q_halt[index]), abs=1e-5)
            assert step.exact == bool((preds[index] == labels).all())
            assert step.token_accuracy == pytest.approx(float((preds[index] == labels).float().mean()))


def test_token_colours_follow_each_kinds_palette() -> None:
    from matplotlib.colors import to_rgb

    arc = token_colours(np.arange(2, 12).reshape(2, 5), "arc", 12)
    assert [tuple(rgb) for rgb in arc.reshape(-1, 3)] == [to_rgb(colour) for colour in ARC_COLOURS]
    maze = token_colours(np.array([[1, 2, 3, 4, 5]]), "maze", 6)
    assert len({tuple(rgb) for rgb in maze[0]}) == 5  # wall, open, start, goal, path all distinct


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--index", "1000000"], "outside the 24 examples"),
        (["--index", "-1"], "must be >= 0"),
        ([], "give --index"),
        (["--index", "0", "--data", "/nonexistent/data"], "does not exist"),
        (["--index", "0", "--split", "validation"], "holds the splits"),
        (["--puzzle", "007bbfb7"], "--puzzle picks ARC puzzles"),
        (["--index", "0", "--out", "figure.jpg"], "ending in .png"),
        (["--index", "0", "--out", "EXISTING"], "already exists"),
    ],
)
def test_visualiser_bad_input(extra: list[str], expected: str, runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    existing = tmp_path / "existing.png"
    existing.write_bytes(b"keep")
    extra = [str(existing) if item == "EXISTING" else str(tmp_path / item) if item == "figure.jpg" else item for item in extra]
    capsys.readouterr()
    assert visualize_main([str(runs["plain"]), "--device", "cpu", *extra]) == 2
    assert expected in one_line_error(capsys)
    assert existing.read_bytes() == b"keep"


def test_visualiser_bad_arc_puzzles(arc_run: Path, arc_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    test_puzzle = sorted(json.loads((arc_data / "test_puzzles.json").read_text()))[0]
    capsys.readouterr()
    assert visualize_main([str(arc_run), "--puzzle", "007bbfb8", "--device", "cpu"]) == 2
    message = one_line_error(capsys)
    assert "not a puzzle" in message and "007bbfb7" in message  # a close name is suggested
    assert visualize_main([str(arc_run), "--puzzle", "007bbfb7", "--device", "cpu"]) == 2  # a training puzzle
    assert "no example in split 'test'" in one_line_error(capsys)
    assert visualize_main([str(arc_run), "--puzzle", test_puzzle, "--index", "5", "--device", "cpu"]) == 2
    assert "has 1 example(s)" in one_line_error(capsys)


def test_evaluation_shows_progress_over_examples(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A long evaluation is never a silent 0/1: the bar counts test examples (here 6, in 2 batches of 4)."""
    from analysis.evaluate import main as evaluate_cli_main

    fixture = FIXTURES / "reference"
    status = evaluate_cli_main(
        [
            str(fixture / "checkpoints" / "hrm_sudoku"),
            "--data",
            str(fixture / "sudoku"),
            "--batch-size",
            "4",
            "--out",
            str(tmp_path / "out"),
            "--device",
            "cpu",
        ]
    )
    assert status == 0
    err = capsys.readouterr().err
    assert "/6 [" in err and "example/s" in err
