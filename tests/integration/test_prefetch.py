"""Reading batches ahead (training/prefetch.py): the same batches in the same order, the same run, exact resume.

The integration tests; the others are in
tests/unit/test_prefetch.py.
"""

from __future__ import annotations

import random
from pathlib import Path

from pretrain import run
from tests.conftest import compose, tiny_overrides
from tests.helpers.reliability import assert_same_training_state, kill_after_checkpoint, read_records
from training.checkpoint import list_checkpoints


def test_a_run_reading_ahead_is_the_run_without(sudoku_data: Path, tmp_path: Path) -> None:
    common = dict(max_steps=14, eval_interval=1, custom_sampling=True, **{"jd.split": "iwrm_with_q_halt_in"})
    plain = Path(run(compose(tiny_overrides(sudoku_data, tmp_path, run_name="plain", prefetch_batches=0, **common)))["run_dir"])
    ahead = Path(run(compose(tiny_overrides(sudoku_data, tmp_path, run_name="ahead", prefetch_batches=2, **common)))["run_dir"])
    assert read_records(plain) == read_records(ahead)
    assert_same_training_state(plain, ahead)
    waits = [r for r in (line for line in (ahead / "metrics.jsonl").read_text().splitlines()) if "train/data_wait_s" in r]
    assert len(waits) == 14


def test_sigkill_mid_epoch_while_reading_ahead_then_resume_matches(sudoku_data: Path, tmp_path: Path) -> None:
    kill_after = random.Random().choice([k for k in range(2, 16) if k % 6])  # 6 batches per epoch: mid-epoch
    common = dict(max_steps=24, epochs=8, eval_interval=2, checkpoint_interval=1, keep_last=3, prefetch_batches=3, custom_sampling=True)
    reference = Path(run(compose(tiny_overrides(sudoku_data, tmp_path, run_name="reference", **common)))["run_dir"])
    args = tiny_overrides(sudoku_data, tmp_path, run_name="killed", **common)
    run_dir = tmp_path / "sudoku4" / "killed"
    kill_after_checkpoint(args, run_dir, kill_after)
    summary = run(compose(args + [f"load_checkpoint={run_dir}"]))
    assert summary["status"] == "finished" and summary["final_step"] == 24
    assert_same_training_state(reference, run_dir)
    assert read_records(run_dir) == read_records(reference), f"metrics differ (killed after step {kill_after})"
    assert list_checkpoints(run_dir)
