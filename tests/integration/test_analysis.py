"""Tests for analysis/: reading runs, the GD-similarity plot, the comparison table and report, W&B guards.

The integration tests; the others are in
tests/unit/test_analysis.py.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from analysis.compare import STATISTICS, compare, summarize
from analysis.plot_gd_similarity import MissingMetricError, OutputExistsError, build_curves, plot_gd_similarity
from analysis.sources import load_runs
from tests.helpers.analysis import (
    jsonl_series,
    write_run,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_module(module: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "MPLBACKEND": "Agg", **(env or {})},
        timeout=120,
    )


def train_tiny_run(workdir: Path, *overrides: str) -> None:
    """Four CPU steps of a tiny TRM on the demo 4x4 Sudoku (built in ``workdir/data`` on first use)."""
    command = [
        sys.executable,
        str(REPO_ROOT / "pretrain.py"),
        "max_steps=4",
        "arch.hidden_size=32",
        "arch.num_heads=2",
        "arch.H_cycles=1",
        "arch.L_cycles=1",
        "arch.halt_max_steps=2",
        "global_batch_size=8",
        "eval_max_batches=1",
        "lr_warmup_steps=0",
        "device=cpu",
        "progress_bar=false",
        "wandb.mode=disabled",
        f"runs_root={workdir / 'runs'}",
        "project_name=e2e",
        *overrides,
    ]
    done = subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, f"pretrain.py failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


def test_plot_skips_runs_without_jd_metrics_and_refuses_to_overwrite(sweep: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    runs = load_runs([sweep], progress=False)
    out = tmp_path / "figs" / "gd_sim"
    written = plot_gd_similarity(runs, out, group_by=("split", "aggregator"), band=True, smooth=3)
    assert [p.name for p in written] == ["gd_sim.png", "gd_sim.svg"]
    assert written[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and b"<svg" in written[1].read_bytes()[:400]
    err = capsys.readouterr().err
    assert "skipping 2 run(s) without 'jd/gd_similarity'" in err and "gd-s0" in err and "gd-s1" in err
    assert [c.label for c in build_curves(runs, "jd/gd_similarity", ("split", "aggregator"))] == [
        "iwrm_with_q_halt_in / mgda (n=1)",
        "iwrm_with_q_halt_in / upgrad (n=2)",
    ]
    with pytest.raises(OutputExistsError, match="gd_sim.png.*--overwrite"):
        plot_gd_similarity(runs, out)
    before = written[0].stat().st_mtime_ns
    plot_gd_similarity(runs, out, overwrite=True)
    assert written[0].stat().st_mtime_ns >= before
    with pytest.raises(MissingMetricError, match="none of the 2 run"):
        plot_gd_similarity([r for r in runs if r.is_gd], tmp_path / "gd_only")
    assert not (tmp_path / "gd_only.png").exists()


def test_plot_command_line(sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "plot"
    done = run_module("analysis.plot_gd_similarity", str(sweep / "sweep" / "*"), "--band", "--smooth", "2", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "plot.png").stat().st_size > 1000 and (tmp_path / "plot.svg").is_file()
    assert "skipping 2 run(s)" in done.stderr
    again = run_module("analysis.plot_gd_similarity", str(sweep), "--out", str(out))
    assert again.returncode == 1 and "output exists" in again.stderr and "--overwrite" in again.stderr
    gd_only = run_module("analysis.plot_gd_similarity", str(sweep / "sweep" / "gd-*"), "--out", str(tmp_path / "g"))
    assert gd_only.returncode == 1 and "none of the 2 run(s) logged 'jd/gd_similarity'" in gd_only.stderr
    bad = run_module("analysis.plot_gd_similarity", str(sweep), "--smooth", "0")
    assert bad.returncode == 2 and "--smooth" in bad.stderr


def test_compare_table_matches_the_metrics_files(sweep: Path, tmp_path: Path) -> None:
    runs = load_runs([sweep], progress=False)
    out = tmp_path / "cmp"
    written = compare(runs, out, html=True)
    assert sorted(p.name for p in written) == [
        "differences.csv",
        "learning_curves.png",
        "learning_curves.svg",
        "report.html",
        "summary.csv",
        "summary.md",
    ]
    with open(out / "summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["split"], r["method"], r["n_runs"]) for r in rows] == [
        ("none", "gd", "2"),
        ("iwrm_with_q_halt_in", "aggregator:mgda", "1"),
        ("iwrm_with_q_halt_in", "aggregator:upgrad", "2"),
    ]
    assert "final_arc_pass@2" not in rows[0]  # no run logged ARC metrics: no column
    upgrad = rows[2]
    dirs = [sweep / "sweep" / n for n in ("upgrad-s0", "upgrad-s1")]
    expected = {
        "final_eval_exact_accuracy": [jsonl_series(d, "eval/exact_accuracy")[-1] for d in dirs],
        "best_eval_exact_accuracy": [max(jsonl_series(d, "eval/exact_accuracy")) for d in dirs],
        "final_train_lm_loss": [jsonl_series(d, "train/lm_loss")[-1] for d in dirs],
        "mean_gd_similarity": [np.mean(jsonl_series(d, "jd/gd_similarity")) for d in dirs],
        "min_gd_similarity": [min(jsonl_series(d, "jd/gd_similarity")) for d in dirs],
        "mean_conflict_fraction": [np.mean(jsonl_series(d, "jd/conflict_fraction")) for d in dirs],
        "median_step_time_s": [np.median(jsonl_series(d, "train/step_time_s")) for d in dirs],
    }
    for column, values in expected.items():
        assert float(upgrad[column]) == pytest.approx(np.mean(values), rel=1e-12), column
        assert float(upgrad[f"{column}_std"]) == pytest.approx(np.std(values, ddof=1), rel=1e-12), column
        assert upgrad[f"{column}_n"] == "2"
    assert rows[0]["mean_gd_similarity"] == "" and rows[0]["mean_gd_similarity_n"] == "0"
    assert rows[1]["final_train_lm_loss_std"] == ""  # one run: no spread
    markdown = (out / "summary.md").read_text()
    assert "| none | gd | 2 | 0,1 |" in markdown and "| iwrm_with_q_halt_in | aggregator:mgda | 1 | 0 |" in markdown
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 1 and 'src="http' not in page and "upgrad-s1" in page


def test_compare_marks_metrics_only_some_runs_logged(tmp_path: Path) -> None:
    write_run(tmp_path, "arc-s0", split="iwrm_with_q_halt_in", seed=0, arc=True)
    write_run(tmp_path, "arc-s1", split="iwrm_with_q_halt_in", seed=1, arc=False)
    runs = load_runs([tmp_path], progress=False)
    summary = summarize(runs)[0]
    assert summary.cells["final_arc_pass@2"].n == 1 and summary.cells["final_arc_pass@2"].std is None
    compare(runs, tmp_path / "out")
    assert "(n=1)" in (tmp_path / "out" / "summary.md").read_text()
    assert {s.column for s in STATISTICS} >= {"final_arc_pass@2", "best_arc_pass@2"}


def test_compare_command_line_and_wandb_report_while_offline(sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    done = run_module("analysis.compare", str(sweep), "--out", str(out), "--html", "--wandb-report", "me/trm-jd", env={"WANDB_MODE": "offline"})
    assert done.returncode == 0, done.stderr
    assert "W&B report not created" in done.stderr and "offline" in done.stderr
    assert all((out / n).is_file() for n in ("summary.md", "summary.csv", "learning_curves.png", "report.html"))
    again = run_module("analysis.compare", str(sweep), "--out", str(out))
    assert again.returncode == 1 and "output exists" in again.stderr
    nothing = run_module("analysis.compare", str(tmp_path / "no-such-runs"), "--out", str(tmp_path / "x"))
    assert nothing.returncode == 1 and "no such file or directory" in nothing.stderr
    assert not (tmp_path / "x").exists()


def test_end_to_end_on_real_training_runs(tmp_path: Path) -> None:
    train_tiny_run(tmp_path, "run_name=gd-s0")
    train_tiny_run(tmp_path, "run_name=upgrad-s0", "jd.split=iwrm_with_q_halt_in", "jd.aggregator=upgrad")
    runs_root = tmp_path / "runs" / "e2e"
    runs = {run.name: run for run in load_runs([runs_root], progress=False)}
    assert set(runs) == {"gd-s0", "upgrad-s0"}
    assert (runs["gd-s0"].aggregator, runs["upgrad-s0"].aggregator) == ("gd", "upgrad")
    similarity = runs["upgrad-s0"].metrics.series("jd/gd_similarity", finite_only=True)[1]
    assert similarity.size >= 1 and np.all((similarity >= -1 - 1e-6) & (similarity <= 1 + 1e-6))

    plot = run_module("analysis.plot_gd_similarity", str(runs_root), "--band", "--out", str(tmp_path / "gd_sim"))
    assert plot.returncode == 0, plot.stderr
    assert (tmp_path / "gd_sim.png").stat().st_size > 1000 and (tmp_path / "gd_sim.svg").is_file()

    out = tmp_path / "cmp"
    done = run_module("analysis.compare", str(runs_root), "--out", str(out), "--html")
    assert done.returncode == 0, done.stderr
    with open(out / "summary.csv", newline="") as handle:
        rows = {(r["split"], r["method"]): r for r in csv.DictReader(handle)}
    assert set(rows) == {("none", "gd"), ("iwrm_with_q_halt_in", "aggregator:upgrad")}
    for (split, aggregator), name in ((("none", "gd"), "gd-s0"), (("iwrm_with_q_halt_in", "aggregator:upgrad"), "upgrad-s0")):
        row, run_dir = rows[(split, aggregator)], runs_root / name
        assert row["n_runs"] == "1"
        assert float(row["final_train_lm_loss"]) == pytest.approx(jsonl_series(run_dir, "train/lm_loss")[-1])
        assert float(row["final_eval_exact_accuracy"]) == pytest.approx(jsonl_series(run_dir, "eval/exact_accuracy")[-1])
    assert float(rows[("iwrm_with_q_halt_in", "aggregator:upgrad")]["mean_gd_similarity"]) == pytest.approx(
        np.mean(jsonl_series(runs_root / "upgrad-s0", "jd/gd_similarity"))
    )
    assert "data:image/png;base64," in (out / "report.html").read_text()
