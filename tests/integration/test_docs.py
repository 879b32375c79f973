"""The documentation site builds with no warning, and every Python snippet of README.md and docs/ runs
on real runs of the demo task (as TorchJD's tests/doc runs its examples)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, compose, tiny_overrides
from tests.helpers.docs import python_snippets

SNIPPETS = python_snippets()


def test_the_site_builds_in_strict_mode(tmp_path: Path) -> None:
    """``mkdocs build --strict``: a broken link, a page missing from the navigation or an API docstring
    griffe cannot read fails it."""
    environment = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    assert (tmp_path / "site" / "api" / "index.html").read_text(encoding="utf-8").count("PivotingProjector") > 0


@pytest.fixture(scope="module")
def demo_runs(sudoku_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``runs/sweep1`` as the snippets name it: GD and IWRM + UPGrad (seed 0), tiny, on generated 4x4 Sudoku."""
    from pretrain import run

    workspace = tmp_path_factory.mktemp("docs")
    for method in (["jd.split=none"], ["jd.split=iwrm_with_q_halt_in", "jd.aggregator=upgrad"]):
        extra = {"project_name": "sweep1", "seed": 0, "epochs": 2}
        run(compose([*tiny_overrides(sudoku_data, workspace / "runs", **extra), *method]))
    return workspace


def test_the_documents_have_python_snippets() -> None:
    assert SNIPPETS


@pytest.mark.parametrize(("where", "code"), SNIPPETS, ids=[where for where, _ in SNIPPETS])
def test_every_python_snippet_runs(where: str, code: str, demo_runs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(demo_runs)
    exec(compile(code, where, "exec"), {"__name__": "__doc_snippet__"})
