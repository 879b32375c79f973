"""Checkpoints written by the previous release resume bit-exactly with the current code.

The fixture (``tests/fixtures/previous_release``, made by its script at the commit it records) holds a
tiny JD run's checkpoints of steps 4 and 8 and its metrics. Resuming step 4 here must reproduce step 8:
weights, both optimizers, EMA, hard-example counts, RNG streams, ACT carries, the JD step's state and
the logged training metrics. Bit-exact where the numerics are the fixture's (same torch build and CPU
instruction set, one thread); within float32 round-off elsewhere (a different kernel may sum in
another order), which the failure message names.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from pretrain import run
from tests.conftest import FIXTURES, compose
from tests.fixtures.previous_release.make_previous_release_fixture import fixture_overrides
from training.checkpoint import list_checkpoints, load_checkpoint

FIXTURE = FIXTURES / "previous_release"


def _same_numerics() -> bool:
    made = json.loads((FIXTURE / "made_with.json").read_text(encoding="utf-8"))
    return made["torch"] == torch.__version__ and made["cpu_capability"] == torch.backends.cpu.get_cpu_capability()


def _assert_same(expected: Any, actual: Any, where: str, exact: bool) -> None:
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and set(actual) == set(expected), (
            f"{where}: keys {sorted(expected)} vs {sorted(actual) if isinstance(actual, dict) else actual}"
        )
        for key in expected:
            _assert_same(expected[key], actual[key], f"{where}.{key}", exact)
    elif isinstance(expected, (list, tuple)):
        assert isinstance(actual, (list, tuple)) and len(actual) == len(expected), where
        for index, (a, b) in enumerate(zip(expected, actual)):
            _assert_same(a, b, f"{where}[{index}]", exact)
    elif isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor) and actual.dtype == expected.dtype and actual.shape == expected.shape, where
        if exact or not expected.is_floating_point():
            assert torch.equal(actual, expected), f"{where} differs from the previous release's"
        else:
            torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-6, msg=f"{where} (not bit-exact: another torch build or CPU)")
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def test_a_previous_release_checkpoint_resumes_bit_exactly(tmp_path: Path) -> None:
    data = tmp_path / "sudoku4"
    shutil.copytree(FIXTURE / "sudoku4", data)
    overrides = fixture_overrides(data, tmp_path / "runs")
    summary = run(compose(overrides + ["run_name=resumed", f"load_checkpoint={FIXTURE / 'step_00000004.pt'}"]))
    assert summary["final_step"] == 8
    run_dir = Path(summary["run_dir"])
    resumed = load_checkpoint(list_checkpoints(run_dir)[-1])
    expected = load_checkpoint(FIXTURE / "step_00000008.pt")
    exact = _same_numerics()
    assert set(resumed) - set(expected) == {"best"}, "only the best-checkpoint record is new since that release"
    for key in sorted(set(expected) - {"config"}):  # the config names other paths and another run
        _assert_same(expected[key], resumed[key], key, exact)
    logged = {r["step"]: r for r in map(json.loads, (FIXTURE / "metrics.jsonl").read_text().splitlines()) if "train/lm_loss" in r}
    now = {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "train/lm_loss" in r}
    for step in range(5, 9):
        for name in ("train/lm_loss", "train/q_halt_loss", "train/grad_norm"):
            if exact:
                assert now[step][name] == logged[step][name], (step, name)
            else:
                assert now[step][name] == pytest.approx(logged[step][name], rel=1e-4), (step, name)
