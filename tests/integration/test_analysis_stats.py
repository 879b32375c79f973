"""Intervals over seeds and differences against GD (analysis/stats.py, analysis.compare), on known answers.

The integration tests; the others are in
tests/unit/test_analysis_stats.py.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from scipy import stats as scipy_stats

from analysis.compare import compare
from analysis.compare import main as compare_main
from analysis.runs import NO_SUMMARY
from analysis.sources import load_runs
from analysis.stats import mean_interval


def _run(root: Path, name: str, *, split: str, seed: int, final: float, epochs: int = 10, status: str | None = "finished") -> None:
    run_dir = root / name
    run_dir.mkdir(parents=True)
    OmegaConf.save(
        OmegaConf.create(
            {
                "run_name": name,
                "seed": seed,
                "epochs": epochs,
                "data_paths": ["d"],
                "arch": {"name": "trm"},
                "jd": {"split": split, "aggregator": None},
            }
        ),
        run_dir / "config.yaml",
    )
    lines = [{"step": s, "train/lm_loss": 1.0 / s, "train/step_time_s": 0.5} for s in range(1, 11)]
    lines += [{"step": 5, "eval/exact_accuracy": final / 2}, {"step": 10, "eval/exact_accuracy": final}]
    if split != "none":
        lines += [{"step": s, "jd/gd_similarity": 0.9} for s in range(1, 11)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    if status is not None:
        (run_dir / "summary.json").write_text(json.dumps({"status": status, "final_step": 10}))


def test_compare_writes_intervals_and_paired_differences(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    gd = [0.30, 0.50, 0.40, 0.60, 0.35]
    jd = [g + d for g, d in zip(gd, [0.10, 0.12, 0.08, 0.11, 0.09])]
    for seed in range(5):
        _run(tmp_path / "runs", f"gd-s{seed}", split="none", seed=seed, final=gd[seed])
        _run(tmp_path / "runs", f"gd-long-s{seed}", split="none", seed=seed, final=gd[seed] + 0.05, epochs=20)
        _run(tmp_path / "runs", f"jd-s{seed}", split="iwrm_with_q_halt_in", seed=seed, final=jd[seed], status=None if seed == 4 else "finished")
    runs = load_runs([tmp_path / "runs"], progress=False)
    out = tmp_path / "report"
    compare(runs, out, group_by=("split", "method", "epochs"), html=True)
    err = capsys.readouterr().err
    assert "averages 1 run(s) that did not finish with 4 finished" in err and NO_SUMMARY in err

    with open(out / "summary.csv", newline="") as handle:
        rows = {(r["split"], r["epochs"]): r for r in csv.DictReader(handle)}
    interval = mean_interval(gd)
    gd_row = rows[("none", "10")]
    assert float(gd_row["final_eval_exact_accuracy"]) == pytest.approx(np.mean(gd))
    assert float(gd_row["final_eval_exact_accuracy_ci_low"]) == pytest.approx(interval.low)
    assert float(gd_row["final_eval_exact_accuracy_ci_high"]) == pytest.approx(interval.high)
    assert float(gd_row["train_time_s"]) == pytest.approx(5.0)

    with open(out / "differences.csv", newline="") as handle:
        diffs = {(r["split"], r["epochs"], r["outcome"]): r for r in csv.DictReader(handle)}
    jd_final = diffs[("iwrm_with_q_halt_in", "10", "final_eval_exact_accuracy")]
    assert jd_final["baseline"] == "gd / epochs=10" and jd_final["test"] == "paired" and jd_final["n"] == "5"
    assert float(jd_final["difference"]) == pytest.approx(0.10)
    assert float(jd_final["p_value"]) == pytest.approx(scipy_stats.ttest_rel(jd, gd).pvalue)
    assert float(jd_final["ci_low"]) > 0.08 and float(jd_final["ci_high"]) < 0.12
    long_final = diffs[("none", "20", "final_eval_exact_accuracy")]
    assert float(long_final["difference"]) == pytest.approx(0.05) and float(long_final["p_value"]) < 1e-9
    assert ("none", "10", "final_eval_exact_accuracy") not in diffs  # the baseline is not compared with itself

    markdown = (out / "summary.md").read_text()
    assert "## Differences against the baseline" in markdown and "paired t (by seed)" in markdown
    assert "| iwrm_with_q_halt_in | aggregator:upgrad | 10 | final_eval_exact_accuracy | 5 | 0.1 [" in markdown
    assert "Differences against the baseline" in (out / "report.html").read_text()


def test_compare_baseline_option(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for seed in range(3):
        _run(tmp_path / "runs", f"gd-s{seed}", split="none", seed=seed, final=0.2 + 0.1 * seed)
        _run(tmp_path / "runs", f"lm-s{seed}", split="lm_loss_vs_q_halt_loss", seed=seed, final=0.3 + 0.1 * seed)
    code = compare_main([str(tmp_path / "runs"), "--out", str(tmp_path / "a"), "--baseline", "lm_loss_vs_q_halt_loss / aggregator:upgrad"])
    assert code == 0
    with open(tmp_path / "a" / "differences.csv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["outcome"] == "final_eval_exact_accuracy"]
    assert [(r["method"], float(r["difference"])) for r in rows] == [("gd", pytest.approx(-0.1))]
    assert compare_main([str(tmp_path / "runs"), "--out", str(tmp_path / "b"), "--baseline", "nope"]) == 1
    assert "no group named 'nope'" in capsys.readouterr().err and not (tmp_path / "b").exists()
