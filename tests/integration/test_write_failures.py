"""Writes that cannot happen (no space, no permission, no such place) are one-line errors, and nothing is lost.

The integration tests; the others are in
tests/unit/test_write_failures.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pretrain import run
from tests.conftest import compose, tiny_overrides
from training.checkpoint import CheckpointError, list_checkpoints, save_checkpoint


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


def test_evaluation_into_an_unwritable_place_fails_before_it_starts(sudoku_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from analysis.evaluate import main as evaluate_main

    summary = run(compose(tiny_overrides(sudoku_data, tmp_path, run_name="e", max_steps=2)))
    capsys.readouterr()
    status = evaluate_main([summary["run_dir"], "--out", "/proc/trm-jd-results", "--quiet"])
    err = capsys.readouterr()
    assert status == 2
    lines = [line for line in err.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: cannot write the results into /proc/trm-jd-results")
    assert "Evaluating" not in err.out  # refused before the evaluation


def test_an_output_path_that_is_a_file_is_one_error(sudoku_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """analysis.export and analysis.study name the file instead of a traceback; the file is untouched."""
    from analysis.export import main as export_main
    from analysis.study import main as study_main

    summary = run(compose(tiny_overrides(sudoku_data, tmp_path, max_steps=2, eval_interval="null", run_name="src")))
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    capsys.readouterr()
    assert export_main([summary["run_dir"], str(a_file)]) == 2
    assert study_main(["--recipe", "sudoku4x4", "--out", str(a_file), "--report-only"]) == 1
    err = capsys.readouterr().err
    assert err.count("is a file") == 2 and "Traceback" not in err and a_file.read_text() == "keep me"


def test_a_full_disk_under_metrics_jsonl_stops_with_one_line_saying_what_was_kept(sudoku_data: Path, tmp_path: Path) -> None:
    """metrics.jsonl's writes fail with a real ENOSPC (its handle reopened on /dev/full) after a checkpoint:
    one error naming the file, the cause, the step and the newest checkpoint; that checkpoint stays whole."""
    import os

    from training.distributed import DistInfo
    from training.run_dir import RunDirError
    from training.trainer import Trainer

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this machine")
    overrides = tiny_overrides(sudoku_data, tmp_path, eval_interval="null", run_name="full", checkpoint_interval=2)
    run(compose(overrides + ["max_steps=4"]))
    trainer = Trainer(compose(overrides + ["max_steps=8", "resume=true"]), DistInfo(0, 1, 0, torch.device("cpu")))
    assert trainer.logger is not None
    trainer.logger._file.close()
    trainer.logger._file = open("/dev/full", "a", buffering=1)  # every write now fails: no space left on the device
    with pytest.raises(RunDirError) as caught:
        trainer.fit()
    message = str(caught.value)
    assert message.startswith("cannot write") and "metrics.jsonl" in message and "no space left" in message
    assert "training stopped at step 5" in message and "newest checkpoint is" in message and "step 4" in message
    assert [p.name for p in list_checkpoints(trainer.run_dir)][-1] == "step_00000004.pt"


def test_a_comparison_that_cannot_be_written_is_one_error_and_leaves_nothing_half_written(sudoku_data: Path, tmp_path: Path) -> None:
    import os

    from analysis.compare import compare
    from analysis.runs import AnalysisError
    from analysis.sources import load_runs

    summary = run(compose(tiny_overrides(sudoku_data, tmp_path, max_steps=2, eval_interval="null", run_name="cmp")))
    runs = load_runs([summary["run_dir"]], progress=False)
    with pytest.raises(AnalysisError, match="cannot write the comparison into /proc/nowhere"):
        compare(runs, Path("/proc/nowhere"))
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this machine")
    out = tmp_path / "report"
    out.mkdir()
    (out / "summary.md").symlink_to("/dev/full")  # the first file written meets a full device (a real ENOSPC)
    with pytest.raises(AnalysisError, match="no space left"):
        compare(runs, out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["summary.md"]  # nothing else was left half-written


def test_builders_exports_and_pictures_that_cannot_be_written_are_one_error(
    sudoku_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A place that cannot be written (here under /proc) gives one error line, no traceback, nothing left behind."""
    from analysis.export import main as export_main
    from analysis.visualize_recursion import main as visualize_main
    from dataset.build_sudoku_dataset import main as build_main

    summary = run(compose(tiny_overrides(sudoku_data, tmp_path, max_steps=2, eval_interval="null", run_name="w")))
    capsys.readouterr()
    with pytest.raises(SystemExit, match="error: cannot write the dataset"):
        build_main(["--generate", "--size", "4", "--num-train", "8", "--num-test", "4", "--output-dir", "/proc/no/data"])
    assert export_main([summary["run_dir"], "/proc/no/export"]) == 2
    assert visualize_main([summary["run_dir"], "--index", "0", "--out", "/proc/no/recursion.png"]) == 2
    err = capsys.readouterr().err
    assert err.count("error: cannot write") == 2 and "Traceback" not in err
