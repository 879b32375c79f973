"""The device check's rehearsal (``--dry-run``): every section runs on the CPU at the tiny size and reports.

The integration tests; the others are in
tests/unit/test_device_check.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from analysis.benchmark import PRESETS
from analysis.device_check import main as device_check_main
from analysis.device_check import max_batch


def test_dry_run_runs_every_section_and_writes_the_targets(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "dc"
    status = device_check_main(["--out", str(out), "--dry-run", "--train-seconds", "6", "--batch-budget-seconds", "15"])
    report = json.loads((out / "device_check.json").read_text())
    assert status == 0, {k: v.get("error") for k, v in report.items() if isinstance(v, dict)}
    eager = report["benchmark"]["eager"]
    assert set(eager) == {"gd", "lm_vs_halt", "iwrm_per_sample", "pixelwise_10", "stack_supervisions"}
    assert all(row["median_ms"] > 0 and row["ratio_to_gd"] > 0 for row in eager.values())
    assert report["arc_training"]["steps"] > 0 and report["arc_training"]["median_data_wait_s"] >= 0
    assert report["adam_atan2"]["pure"]["median_ms"] > 0 and "not" in report["adam_atan2"]["fused"]
    assert report["gpu_tests"]["passed"]
    projector = {row["case"]: row for row in report["projector"]["rows"]}
    assert {"synthetic m=32", "real step1200-m64"} <= set(projector)
    assert all(row["pivoting_ms"] > 0 and row["pivoting_min_cos"] >= -1e-6 for row in projector.values())
    assert set(report["compile"]["rows"]) == {"gd/eager", "iwrm-per_sample/eager"}
    assert all(row["steady_ms"] > 0 for row in report["compile"]["rows"].values()), report["compile"]
    assert all(row["verdict"].startswith("rehearsal") for row in report["targets"])
    markdown = (out / "device_check.md").read_text()
    assert "| target | measured | verdict |" in markdown and "iwrm_per_sample" in markdown
    assert "| iwrm-per_sample/eager |" in markdown and "| real step1200-m64 |" in markdown
    assert device_check_main(["--out", str(out), "--dry-run"]) == 1  # never overwritten without --overwrite
    assert "exists" in capsys.readouterr().err


def test_batch_bisection_finds_the_edge() -> None:
    # A stand-in memory: batches up to 100 fit. Doubling 16 -> 128 fails, bisection narrows to 96 < edge <= 112.
    found = max_batch(dict(PRESETS["tiny"]), __import__("torch").device("cpu"), compiled=False, budget_s=60, cap=100, start=16)
    assert found["largest_fitting"] == 96 and found["smallest_failing"] == 112 and found["complete"]
    assert [t["batch"] for t in found["trials"]] == [16, 32, 64, 128, 96, 112]
