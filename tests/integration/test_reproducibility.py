"""The same command and seed give the same numbers on the same machine, whatever its load.

Two real runs of ``pretrain.py`` (a subprocess each, the thread count left to its default), one of them
beside another process that keeps a core busy: every logged value is bit-identical, wall-clock times
aside. Before this rule the default thread count followed the load and such runs parted at step 3.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import REPO, tiny_overrides
from tests.helpers.reliability import WALL_CLOCK_KEYS

BUSY_LOOP = "import time\nend = time.time() + 300\nwhile time.time() < end:\n    pass\n"


def _wait_until_busy(limit_s: float = 100.0) -> None:
    """Until the 1-minute load shows the busy processes (the old thread rule read it), at most ``limit_s``."""
    cores = os.cpu_count() or 1
    end = time.time() + limit_s
    while os.getloadavg()[0] < cores - 0.5 and time.time() < end:
        time.sleep(2)


def _run(data: Path, runs: Path, name: str) -> tuple[list[dict], dict]:
    overrides = tiny_overrides(data, runs, max_steps=25, eval_interval="null", run_name=name)
    subprocess.run([sys.executable, "pretrain.py", *overrides], cwd=REPO, check=True, capture_output=True, timeout=600)
    run_dir = runs / "sudoku4" / name
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    return [{k: v for k, v in record.items() if k not in WALL_CLOCK_KEYS} for record in records], summary


def test_a_run_beside_a_busy_process_logs_the_same_numbers(sudoku_data: Path, tmp_path: Path) -> None:
    quiet, quiet_summary = _run(sudoku_data, tmp_path, "quiet")
    busy = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(os.cpu_count() or 1)]
    try:
        _wait_until_busy()
        loaded, loaded_summary = _run(sudoku_data, tmp_path, "loaded")
    finally:
        for process in busy:
            process.kill()
    assert len(quiet) >= 25 and any("eval/exact_accuracy" in record for record in quiet)
    assert quiet == loaded
    assert quiet_summary["numerics"] == loaded_summary["numerics"]
    assert quiet_summary["numerics"]["threads"] >= 1 and quiet_summary["numerics"]["torch"]
