"""Shared by the reliability tests (tests/*/test_reliability.py)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from pretrain import main
from tests.conftest import REPO
from training.checkpoint import list_checkpoints, load_checkpoint


def file_hashes(root: Path) -> dict[str, str]:
    """SHA-256 of every file under ``root`` (W&B's own folder and the run lock's holder note excluded), by relative path."""
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file() and "wandb" not in path.parts and path.name != ".lock"
    }


def assert_files_kept(before: dict[str, str], root: Path, allow_changed: tuple[str, ...] = ()) -> None:
    """Every file of ``before`` still exists under ``root`` with the same content (except ``allow_changed``)."""
    after = file_hashes(root)
    lost = sorted(set(before) - set(after))
    changed = sorted(name for name in before if name in after and after[name] != before[name] and name not in allow_changed)
    assert not lost and not changed, f"lost {lost}, overwritten {changed}"


WALL_CLOCK_KEYS = frozenset({"train/step_time_s", "train/data_wait_s"})


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    """``metrics.jsonl`` without the wall-clock timings (the only values that may differ between runs)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in record.items() if k not in WALL_CLOCK_KEYS} for record in records]


def assert_identical(a: Any, b: Any, where: str = "state") -> None:
    """Recursive bitwise equality of checkpoint contents (tensors, dicts, lists, numbers, strings)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())), (
            where
        )
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(set(a) ^ set(b))}"
        for key in a:
            assert_identical(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{index}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_training_state(run_a: Path, run_b: Path, count_evaluations: bool = True) -> None:
    """The newest checkpoints of two runs hold the same training state (their configs may differ in run_dir)."""
    a, b = (load_checkpoint(list_checkpoints(run)[-1]) for run in (run_a, run_b))
    for state in (a, b):
        state.pop("config")
        if not count_evaluations:  # nor what they found: the best-checkpoint record
            state["progress"].pop("evaluations")
            state.pop("best")
    assert_identical(a, b)


def subprocess_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHELASTIC_") and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def wait_for(condition: Any, process: subprocess.Popen[str], timeout: float = 120.0) -> None:
    """Poll ``condition()`` every few milliseconds until it holds; fail if the process ends first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            out, err = process.communicate()
            pytest.fail(f"the training process ended (rc={process.returncode}) before the fault was injected:\n{out[-2000:]}\n{err[-2000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("timed out waiting for the training process")
        time.sleep(0.003)


def cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run ``pretrain.py ARGS`` in this process; return ``(exit status, stdout, stderr)``."""
    capsys.readouterr()
    status = main(args)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_one_line_error(err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"


def kill_after_checkpoint(args: list[str], run_dir: Path, step: int) -> None:
    """Start ``pretrain.py ARGS`` and SIGKILL it as soon as the checkpoint of ``step`` exists."""
    process = start_pretrain(args)
    wait_for(lambda: (run_dir / "checkpoints" / f"step_{step:08d}.pt").exists(), process)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL


def start_pretrain(args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "pretrain.py", *args], cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
