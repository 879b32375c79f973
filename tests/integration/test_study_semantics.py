"""The JD study's experiments as it ran them: its stacks' objectives, hard-example sampling, frozen weights,.

The integration tests; the others are in
tests/unit/test_study_semantics.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pretrain import run
from tests.conftest import compose, tiny_overrides


def test_the_studys_fine_tuning_recipe_runs_end_to_end(sudoku_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Pretrain on one dataset, then fine-tune on another (new puzzle table from the mean of the old rows),
    weights frozen, with Jacobian descent and the study's hard-example sampling."""
    from dataset.build_sudoku_dataset import build_generated_sudoku

    pretrained = run(compose(tiny_overrides(sudoku_data, tmp_path, max_steps=4, run_name="pre", eval_interval="null")))
    other = tmp_path / "other"
    build_generated_sudoku(other, size=4, num_train=48, num_test=8, min_givens=6, max_givens=8, seed=5, progress=False)
    summary = run(
        compose(
            tiny_overrides(other, tmp_path, max_steps=3, run_name="ft", eval_interval="null")
            + [
                f"init_from={pretrained['run_dir']}",
                "freeze_weights=true",
                "custom_sampling=true",
                "jd.split=stack_supervisions",
                "jd.aggregator=upgrad",
            ]
        )
    )
    assert summary["status"] == "finished" and summary["final_step"] == 3
    assert "init_from: weights from the checkpoint" in capsys.readouterr().out
    source = torch.load(Path(pretrained["checkpoint"]), weights_only=True)["model"]
    tuned = torch.load(Path(summary["checkpoint"]), weights_only=True)["model"]
    assert all(torch.equal(source[k], tuned[k]) for k in source if k != "puzzle_embedding.weights")


def test_an_optuna_search_of_two_trials_runs_to_the_end(sudoku_data: Path, tmp_path: Path) -> None:
    """``python pretrain.py -m hydra/sweeper=study_sweep``: each trial's return value is its objective."""
    import os
    import subprocess
    import sys

    import yaml

    from tests.conftest import REPO

    args = [
        sys.executable,
        str(REPO / "pretrain.py"),
        "-m",
        "hydra/sweeper=study_sweep",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.params={arch.H_cycles: 'choice(1, 2)', lr: 'interval(1e-4, 1e-3)'}",
        *tiny_overrides(sudoku_data, tmp_path, max_steps=2, eval_interval="null"),
    ]
    result = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    (found,) = (tmp_path / "multirun").glob("*/optimization_results.yaml")  # under runs_root
    results = yaml.safe_load(found.read_text())
    assert results["name"] == "optuna" and 0.0 <= results["best_value"] <= 1.0
    assert "lr" in results["best_params"]  # searched; the arch values given on the command line stay fixed
    runs = [p for p in (tmp_path / "sudoku4").iterdir() if (p / "summary.json").is_file()]
    values = sorted(json.loads((p / "summary.json").read_text())["eval"]["eval/exact_accuracy"] for p in runs)
    assert len(runs) == 2 and results["best_value"] == max(values)


def test_an_optuna_search_goes_on_past_a_failed_trial(sudoku_data: Path, tmp_path: Path) -> None:
    """A trial that fails (here an invalid lr) returns the worst value and the search finishes; the data
    paths can be searched with choice() on the command line."""
    import os
    import subprocess
    import sys

    import yaml

    from tests.conftest import REPO

    args = [
        sys.executable,
        str(REPO / "pretrain.py"),
        "-m",
        "hydra/sweeper=study_sweep",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.params={lr: 'choice(-1.0, 1e-3)'}",
        f"data_paths=choice([{sudoku_data}],[{sudoku_data}])",
        *[o for o in tiny_overrides(sudoku_data, tmp_path, max_steps=2, eval_interval="null") if not o.startswith("data_paths=")],
    ]
    result = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    (found,) = (tmp_path / "multirun").glob("*/optimization_results.yaml")
    results = yaml.safe_load(found.read_text())
    assert results["best_params"]["lr"] == 1e-3 and 0.0 <= results["best_value"] <= 1.0
    assert "returns -inf to the sweeper" in result.stdout + result.stderr  # a trial did fail
