"""Writes that cannot happen (no space, no permission, no such place) are one-line errors, and nothing is lost."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch

from pretrain import run
from tests.conftest import compose, tiny_overrides
from training.checkpoint import CheckpointError, list_checkpoints, save_checkpoint, write_failure


def test_the_cause_is_named(tmp_path: Path) -> None:
    assert "no space left on the device" in write_failure(tmp_path, OSError(errno.ENOSPC, "No space left on device"))
    assert "no space left" in write_failure(tmp_path, RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64"))
    assert "is not writable (Read-only file system)" in write_failure(tmp_path, OSError(errno.EROFS, "Read-only file system"))
    assert write_failure(tmp_path, OSError(errno.EIO, "Input/output error")).startswith("[Errno 5]")


def test_a_checkpoint_that_cannot_be_written_keeps_the_earlier_ones(sudoku_data: Path, tmp_path: Path) -> None:
    summary = run(compose(tiny_overrides(sudoku_data, tmp_path, run_name="r", max_steps=2, checkpoint_interval=1)))
    run_dir = Path(summary["run_dir"])
    before = {p.name: p.read_bytes() for p in list_checkpoints(run_dir)}
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "checkpoints").write_text("a file where the checkpoints folder should be")
    with pytest.raises(CheckpointError, match=r"cannot write the checkpoint .*blocked/checkpoints/step_00000003.pt"):
        save_checkpoint({"model": {"w": torch.zeros(1)}}, blocked, 3, keep_last=2)
    assert {p.name: p.read_bytes() for p in list_checkpoints(run_dir)} == before


def test_evaluation_into_an_unwritable_place_fails_before_it_starts(sudoku_data: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from evaluators.run import main as evaluate_main

    summary = run(compose(tiny_overrides(sudoku_data, tmp_path, run_name="e", max_steps=2)))
    capsys.readouterr()
    status = evaluate_main([summary["run_dir"], "--out", "/proc/trm-jd-results", "--quiet"])
    err = capsys.readouterr()
    assert status == 2
    lines = [line for line in err.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: cannot write the results into /proc/trm-jd-results")
    assert "Evaluating" not in err.out  # refused before the evaluation


def test_an_output_path_that_is_a_file_is_one_error(sudoku_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """evaluators.export and analysis.study name the file instead of a traceback; the file is untouched."""
    from analysis.study import main as study_main
    from evaluators.export import main as export_main

    summary = run(compose(tiny_overrides(sudoku_data, tmp_path, max_steps=2, eval_interval="null", run_name="src")))
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    capsys.readouterr()
    assert export_main([summary["run_dir"], str(a_file)]) == 2
    assert study_main(["--recipe", "sudoku4x4", "--out", str(a_file), "--report-only"]) == 1
    err = capsys.readouterr().err
    assert err.count("is a file") == 2 and "Traceback" not in err and a_file.read_text() == "keep me"
