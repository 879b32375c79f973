"""The device check's rehearsal (``--dry-run``): every section runs on the CPU at the tiny size and reports.

This file holds the unit tests; the others are in tests/integration/test_device_check.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from analysis.device_check import main, targets_table


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


@pytest.mark.parametrize(
    "flags", [["--only", "projecter"], ["--skip", "compile,gpu_test"], ["--only", "compile", "--skip", "projector"]], ids=["misspelt", "skip", "both"]
)
def test_unknown_or_conflicting_sections_are_refused_before_anything_runs(
    flags: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--out", str(tmp_path / "dc"), "--dry-run", *flags]) == 1
    error = capsys.readouterr().err
    assert "--skip and --only take sections from gpu_tests, benchmark" in error and not (tmp_path / "dc").exists()
