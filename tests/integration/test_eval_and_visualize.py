"""Standalone evaluation (``python -m analysis.evaluate``) and the recursion visualiser, on real tiny runs.

The integration tests; the others are in
tests/unit/test_eval_and_visualize.py,
tests/distributed/test_eval_and_visualize.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from analysis.visualize_recursion import (
    find_example_index,
    load_example,
    render_recursion,
    trace_recursion,
    view_window,
)
from analysis.visualize_recursion import main as visualize_main
from dataset.arc_augment import tokens_to_grid
from dataset.common import read_metadata
from models.loss_terms import IGNORE_LABEL_ID
from models.registry import build_model
from tests.conftest import tiny_arch
from tests.helpers.eval_and_visualize import evaluate_cli, last_eval  # noqa: F401 - pytest fixtures

CPU = torch.device("cpu")


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_SIGNATURE and path.stat().st_size > 5000


def test_arc_checkpoint_scores_and_writes_a_submission(arc_run: Path, arc_data: Path, tmp_path: Path) -> None:
    assert evaluate_cli(str(arc_run), "--out", str(tmp_path / "arc")) == 0
    record = json.loads((tmp_path / "arc" / "metrics.json").read_text())
    logged = last_eval(arc_run)
    assert "ARC/pass@2" in logged
    for key, value in logged.items():
        assert record["metrics"][key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    submission = json.loads((tmp_path / "arc" / "submission.json").read_text())
    assert set(submission) == set(json.loads((arc_data / "test_puzzles.json").read_text()))


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


def test_render_a_maze_with_a_freshly_built_model(tmp_path: Path) -> None:
    from dataset.build_maze_dataset import build_generated_maze

    path = build_generated_maze(tmp_path / "maze", size=7, num_train=2, num_test=1, progress=False)
    metadata = read_metadata(path)
    model = build_model(tiny_arch(puzzle_emb_ndim=0), seq_len=metadata.seq_len, vocab_size=metadata.vocab_size, num_puzzle_identifiers=1, device=CPU)
    example = load_example(path, "test", 0)
    steps = trace_recursion(model, example.batch)
    assert len(steps) == 3 and all(step.tokens.shape == (49,) for step in steps)
    assert _is_png(render_recursion(example, steps, str(tmp_path / "maze.png"), "maze"))
