"""Fault injection on CPU: killed and interrupted runs, restarts, non-finite steps and bad input.

Every test trains a real tiny TRM (``tests/conftest.py``) through the code path of ``pretrain.py``,
in-process or as a real subprocess, injects a fault with real means (SIGKILL, SIGTERM, SIGINT, a
killed ``torchrun`` worker, a NaN parameter, a too large learning rate, damaged files) and checks
the stated outcome, and that no file a user already had was lost or overwritten.

Exactness: a resumed run must reach the same checkpoint (model, optimizers, EMA, progress, RNG
streams, ACT carries, JD state) and log the same metrics as an uninterrupted one, bit for bit on CPU
with one thread (``torch.set_num_threads(1)`` here, ``OMP_NUM_THREADS=1`` in subprocesses).

This file holds the unit tests; the others are in tests/integration/test_reliability.py, tests/distributed/test_reliability.py.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_overrides
from tests.helpers.reliability import assert_one_line_error, cli
from training.checkpoint import list_checkpoints, load_checkpoint
from training.interrupt import StopSignals


def test_a_second_signal_stops_at_once() -> None:
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    with StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert signals.received == "SIGTERM"
        with pytest.raises(SystemExit) as stopped:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        assert stopped.value.code == 128 + signal.SIGTERM
    with StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert signals.received == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers


def test_the_cli_reports_divergence_in_one_line_with_status_3(sudoku_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = tiny_overrides(
        sudoku_data, tmp_path, run_name="huge-lr", lr=1e30, lr_warmup_steps=0, max_steps=20, max_nonfinite_steps=2, ema=True, checkpoint_interval=1
    )
    status, _, err = cli(args, capsys)
    assert status == 3
    assert_one_line_error(err, "training diverged")
    summary = json.loads((tmp_path / "sudoku4" / "huge-lr" / "summary.json").read_text())
    assert summary["status"] == "stopped: non-finite" and summary["final_step"] < 20
    for checkpoint in list_checkpoints(tmp_path / "sudoku4" / "huge-lr"):
        state = load_checkpoint(checkpoint)
        assert all(torch.isfinite(v).all() for v in (*state["model"].values(), *state["ema"].values()))


def test_a_signal_while_starting_stops_with_a_word_and_a_second_signal_is_named_in_the_status(capfd: pytest.CaptureFixture[str]) -> None:
    from training.interrupt import StartupSignals, stopped_at_once_status

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    for sig in (signal.SIGTERM, signal.SIGINT):
        with pytest.raises(SystemExit) as stopped:
            with StartupSignals():
                os.kill(os.getpid(), sig)
                time.sleep(1)
        assert stopped.value.code == 128 + sig
        assert f"{sig.name} received before training started" in capfd.readouterr().err
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers
    assert stopped_at_once_status(SystemExit(128 + signal.SIGTERM)) == "stopped by a second SIGTERM, without a new checkpoint"
    assert stopped_at_once_status(KeyboardInterrupt()) == "stopped by a second SIGINT, without a new checkpoint"
    assert stopped_at_once_status(ValueError()) is None
