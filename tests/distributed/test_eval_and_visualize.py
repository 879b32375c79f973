"""Standalone evaluation (``python -m analysis.evaluate``) and the recursion visualiser, on real tiny runs.

The distributed tests; the others are in
tests/unit/test_eval_and_visualize.py,
tests/integration/test_eval_and_visualize.py.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


def test_torchrun_with_two_processes_gives_the_single_process_metrics(runs: dict[str, Path], tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port), "-m", "analysis.evaluate"]
    for out, launcher in ((tmp_path / "two", command), (tmp_path / "one", [sys.executable, "-m", "analysis.evaluate"])):
        result = subprocess.run(
            [*launcher, str(runs["ema"]), "--device", "cpu", "--quiet", "--out", str(out)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        assert result.returncode == 0, result.stderr[-2000:]
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["metrics"] == pytest.approx(one["metrics"], rel=1e-6)
