"""The device check's rehearsal (``--dry-run``): every section runs on the CPU at the tiny size and reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from analysis.benchmark import PRESETS
from analysis.device_check import main as device_check_main
from analysis.device_check import max_batch, targets_table


@pytest.mark.slow
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
    assert all(row["verdict"].startswith("rehearsal") for row in report["targets"])
    markdown = (out / "device_check.md").read_text()
    assert "| target | measured | verdict |" in markdown and "iwrm_per_sample" in markdown
    assert device_check_main(["--out", str(out), "--dry-run"]) == 1  # never overwritten without --overwrite
    assert "exists" in capsys.readouterr().err


def test_batch_bisection_finds_the_edge() -> None:
    # A stand-in memory: batches up to 100 fit. Doubling 16 -> 128 fails, bisection narrows to 96 < edge <= 112.
    found = max_batch(dict(PRESETS["tiny"]), __import__("torch").device("cpu"), compiled=False, budget_s=60, cap=100, start=16)
    assert found["largest_fitting"] == 96 and found["smallest_failing"] == 112 and found["complete"]
    assert [t["batch"] for t in found["trials"]] == [16, 32, 64, 128, 96, 112]


def test_targets_are_met_or_not_by_the_numbers() -> None:
    report = {
        "dry_run": False,
        "benchmark": {
            "compiled": {
                "gd": {"median_ms": 100.0, "peak_mib": 10 * 1024.0},
                "lm_vs_halt": {"ratio_to_gd": 1.2, "mem_ratio_to_gd": 1.1},
                "iwrm_per_sample": {"ratio_to_gd": 1.8, "mem_ratio_to_gd": 2.5},
                "pixelwise_10": {"ratio_to_gd": 4.0},
            }
        },
        "max_batch": {"largest_fitting": 384},
        "arc_training": {"loss_fell": True, "data_wait_share": 0.2},
    }
    verdicts = {row["target"]: row["verdict"] for row in targets_table(report)}
    assert verdicts["lm_vs_halt step <= 1.5x compiled GD"] == "met"
    assert verdicts["iwrm_per_sample step <= 1.5x compiled GD"] == "NOT met"
    assert verdicts["iwrm_per_sample peak memory <= 2.0x GD"] == "NOT met"
    assert verdicts["pixelwise_10 peak memory <= 2.0x GD"] == "unmeasured"
    assert verdicts["GD step <= 112.0 ms (reference, H100)"] == "met"
    assert verdicts["GD peak memory <= 17.2 GiB (reference, H100)"] == "met"
    assert verdicts["largest GD batch per GPU > 96 (reference)"] == "met"
    assert verdicts["ARC training: data wait < 5% of the step"] == "NOT met"
