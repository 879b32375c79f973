"""analysis.study: a real (tiny) grid of arms x seeds, its report, and resuming a half-finished study.

This file holds the unit tests; the others are in tests/integration/test_study.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from analysis.study import main as study_main


def test_study_refuses_unknown_arms_and_bad_overrides(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert study_main(["--recipe", "sudoku4x4", "--out", str(tmp_path / "s"), "--arms", "gd,nope"]) == 1
    assert "has no arm 'nope'" in capsys.readouterr().err
    assert study_main(["--recipe", "sudoku4x4", "--out", str(tmp_path / "s"), "--set", "epochs"]) == 1
    assert "--set expects KEY=VALUE" in capsys.readouterr().err
    assert study_main(["--recipe", "sudoku4x4", "--out", str(tmp_path / "s"), "--set", "lrr=1"]) == 1
    assert "lrr" in capsys.readouterr().err and not (tmp_path / "s").exists()
