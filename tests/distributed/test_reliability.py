"""Fault injection on CPU: killed and interrupted runs, restarts, non-finite steps and bad input.

The distributed tests; the others are in
tests/unit/test_reliability.py,
tests/integration/test_reliability.py.
"""

from __future__ import annotations

import glob
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain import run
from tests.conftest import REPO, compose, tiny_overrides
from tests.helpers.reliability import (
    assert_files_kept,
    assert_same_training_state,
    file_hashes,
    read_records,
    subprocess_env,
    wait_for,
)
from training.config import ConfigError
from training.distributed import ElasticInfo
from training.run_dir import plan_run


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in glob.glob(f"/proc/{pid}/task/*/children"):
        found += [int(child) for child in Path(task).read_text().split()]
    return found


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the torchrun worker through /proc")
def test_torchrun_restart_resumes_from_the_latest_checkpoint(sudoku_data: Path, tmp_path: Path) -> None:
    kill_after = random.Random().randint(2, 8)
    common = dict(max_steps=36, epochs=6, eval_interval=1, checkpoint_interval=1, keep_last=100)
    reference = Path(run(compose(tiny_overrides(sudoku_data, tmp_path / "ref", run_name="reference", **common)))["run_dir"])
    # No run_name: the generated name must be found again by the restarted worker (torchrun's run id).
    args = tiny_overrides(sudoku_data, tmp_path / "elastic", **common)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--max-restarts", "1", "--monitor-interval", "0.1"]
    process = subprocess.Popen(
        [*torchrun, "pretrain.py", *args], cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    pattern = str(tmp_path / "elastic" / "sudoku4" / "*" / "checkpoints" / f"step_{kill_after:08d}.pt")
    wait_for(lambda: bool(glob.glob(pattern)), process)
    workers = _children(process.pid)
    assert len(workers) == 1
    os.kill(workers[0], signal.SIGKILL)  # a real worker crash, in the middle of training
    run_dir = Path(glob.glob(pattern)[0]).parents[1]
    first_attempt = {name: digest for name, digest in file_hashes(run_dir).items() if name.startswith("checkpoints/step_")}
    out, err = process.communicate(timeout=300)

    assert process.returncode == 0, err[-3000:]
    assert "-job-" in run_dir.name and [p.name for p in run_dir.parent.iterdir()] == [run_dir.name]
    assert f"Resuming from {run_dir / 'checkpoints'}" in out, out[-2000:]
    assert_files_kept(first_attempt, run_dir)  # the restart resumed: it rewrote none of the first attempt's checkpoints
    assert_same_training_state(reference, run_dir)
    assert read_records(run_dir) == read_records(reference)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the torchrun workers through /proc")
@pytest.mark.parametrize("standalone", [False, True], ids=["default-rdzv", "standalone"])
def test_two_workers_restart_after_one_is_killed(standalone: bool, sudoku_data: Path, tmp_path: Path) -> None:
    """With 2 workers, killing rank 1 makes torchrun stop rank 0 and restart both; they resume from the newest
    checkpoint and end where an uninterrupted 2-worker run ends (same state, same metrics)."""
    common = dict(max_steps=30, epochs=6, eval_interval=2, checkpoint_interval=1, keep_last=100, run_name="two")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--max-restarts", "1", "--monitor-interval", "0.1"]
    torchrun += ["--standalone"] if standalone else []

    def start(root: Path) -> subprocess.Popen[str]:
        args = tiny_overrides(sudoku_data, root, **common)
        return subprocess.Popen(
            [*torchrun, "pretrain.py", *args], cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    reference = start(tmp_path / "ref")
    assert reference.wait(timeout=300) == 0, reference.communicate()[1][-3000:]
    process = start(tmp_path / "killed")
    run_dir = tmp_path / "killed" / "sudoku4" / "two"
    wait_for(lambda: (run_dir / "checkpoints" / "step_00000005.pt").exists(), process)
    workers = _children(process.pid)
    assert len(workers) == 2
    os.kill(max(workers), signal.SIGKILL)  # one of the two workers crashes
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    assert f"Resuming from {run_dir / 'checkpoints'}" in out, out[-2000:]
    assert "received while starting" not in err, "the stopped rank says what happened"
    assert_same_training_state(tmp_path / "ref" / "sudoku4" / "two", run_dir)
    assert read_records(run_dir) == read_records(tmp_path / "ref" / "sudoku4" / "two")


def test_restart_rules_need_a_directory_that_can_be_found_again(sudoku_data: Path, tmp_path: Path) -> None:
    config = compose(tiny_overrides(sudoku_data, tmp_path))
    with pytest.raises(ConfigError, match="run_name"):
        plan_run(config, ElasticInfo(restart_count=0, max_restarts=2, run_id="none"))  # multi-node torchrun without --rdzv-id
    plan = plan_run(config, ElasticInfo(restart_count=0, max_restarts=2, run_id="4f2a-job"))
    assert plan.run_dir == tmp_path / "sudoku4" / "trm-gd-s0-job-4f2a-job" and plan.checkpoint is None and not plan.continues_run
    # A restart before the first checkpoint starts over in the same directory (which the first attempt created).
    plan.run_dir.mkdir(parents=True)
    (plan.run_dir / "config.yaml").write_text("x")
    restart = plan_run(config, ElasticInfo(restart_count=1, max_restarts=2, run_id="4f2a-job"))
    assert restart.run_dir == plan.run_dir and restart.checkpoint is None and restart.continues_run and "no checkpoint" in (restart.note or "")
