"""The commands' earlier names keep working: ``python -m evaluators.run`` and ``python -m evaluators.export`` run
``analysis.evaluate`` and ``analysis.export`` (the library in ``evaluators/`` never imports them)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.parametrize(("alias", "target"), [("evaluators.run", "analysis.evaluate"), ("evaluators.export", "analysis.export")])
def test_the_old_command_names_run_the_moved_modules(alias: str, target: str) -> None:
    old = subprocess.run([sys.executable, "-m", alias, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    new = subprocess.run([sys.executable, "-m", target, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert old.returncode == 0 == new.returncode, old.stderr
    assert old.stdout == new.stdout and f"python -m {target}" in old.stdout
