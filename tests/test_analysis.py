"""Tests for analysis/: reading runs, the GD-similarity plot, the comparison table and report, W&B guards."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from omegaconf import OmegaConf

from analysis.compare import STATISTICS, compare, summarize
from analysis.plot_gd_similarity import MissingMetricError, OutputExistsError, build_curves, mean_curve, moving_average, plot_gd_similarity
from analysis.runs import (
    DEFAULT_GROUP_BY,
    NO_SUMMARY,
    AnalysisError,
    MetricTable,
    RunLoadError,
    group_runs,
    load_run_dir,
    parse_label_fields,
    read_metrics_file,
)
from analysis.sources import load_runs
from analysis.wandb_source import (
    WandbUnavailableError,
    ensure_wandb_available,
    find_wandb_credentials,
    parse_wandb_source,
    run_from_history,
    wandb_unavailable_reason,
)

REPO_ROOT = REPO


# ----------------------------------------------------------------------------------------------- helpers


def write_run(
    root: Path,
    name: str,
    *,
    split: str = "none",
    aggregator: str = "upgrad",
    seed: int = 0,
    steps: int = 20,
    eval_every: int = 5,
    project: str = "sweep",
    arch: str = "trm",
    data_paths: tuple[str, ...] = ("data/sudoku-tiny",),
    arc: bool = False,
    summary: bool = True,
    project_in_config: bool = True,
) -> Path:
    """A run directory as the trainer writes it: config.yaml, metrics.jsonl (train and eval lines apart)."""
    run_dir = root / project / name
    run_dir.mkdir(parents=True)
    config = {
        "run_name": name,
        "project_name": project if project_in_config else None,
        "seed": seed,
        "data_paths": list(data_paths),
        "arch": {"name": arch, "hidden_size": 32},
        "global_batch_size": 8,
        "max_steps": steps,
        "jd": {"split": split, "aggregator": aggregator},
    }
    OmegaConf.save(OmegaConf.create(config), run_dir / "config.yaml")
    rng = np.random.default_rng(zlib.crc32(f"{name}-{seed}".encode()))
    lines = []
    for step in range(1, steps + 1):
        train: dict[str, Any] = {
            "step": step,
            "train/lm_loss": float(3.0 / step + rng.uniform(0, 0.1)),
            "train/step_time_s": float(rng.uniform(0.1, 0.2)),
            "train/lr": 1e-4,
        }
        if split != "none":
            train["jd/gd_similarity"] = float(rng.uniform(0.5, 1.0))
            train["jd/conflict_fraction"] = float(rng.uniform(0.0, 0.5))
            train["jd/num_objectives"] = 8.0
        lines.append(train)
        if step % eval_every == 0:
            evaluation: dict[str, Any] = {"step": step, "eval/exact_accuracy": float(rng.uniform(0, 1))}
            if arc:
                evaluation["ARC/pass@2"] = float(rng.uniform(0, 1))
            lines.append(evaluation)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    if summary:
        (run_dir / "summary.json").write_text(json.dumps({"final_step": steps, "status": "finished"}))
    return run_dir


def jsonl_series(run_dir: Path, key: str) -> list[float]:
    """The values of ``key`` in file order, read straight from metrics.jsonl."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    return [r[key] for r in records if key in r]


@pytest.fixture()
def sweep(tmp_path: Path) -> Path:
    """runs/sweep with GD x2 seeds, IWRM+UPGrad x2 seeds, IWRM+MGDA x1 seed; a wandb/ folder that is no run."""
    root = tmp_path / "runs"
    write_run(root, "gd-s0", seed=0)
    write_run(root, "gd-s1", seed=1)
    write_run(root, "upgrad-s0", split="iwrm_with_q_halt_in", aggregator="upgrad", seed=0)
    write_run(root, "upgrad-s1", split="iwrm_with_q_halt_in", aggregator="upgrad", seed=1)
    write_run(root, "mgda-s0", split="iwrm_with_q_halt_in", aggregator="mgda", seed=0, summary=False)
    offline = root / "sweep" / "gd-s0" / "wandb" / "offline-run-1" / "files"
    offline.mkdir(parents=True)
    (offline / "config.yaml").write_text("wandb_version: 1\n")
    return root


def run_module(module: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "MPLBACKEND": "Agg", **(env or {})},
        timeout=120,
    )


# ----------------------------------------------------------------------------------------------- reading


def test_metric_table_merges_lines_of_one_step_and_keeps_logged_nan() -> None:
    table = MetricTable.from_records(
        [
            {"step": 2, "train/lm_loss": 1.5, "note": "text", "flag": True},
            {"step": 1, "train/lm_loss": 2.0},
            {"step": 2, "eval/exact_accuracy": 0.25},
            {"step": 2, "train/lm_loss": 1.25},  # logged again at the same step: the later value wins
            {"step": 3, "train/lm_loss": float("nan")},
            {"step": 4, "train/grad_norm": "inf", "train/lm_loss": "nan"},  # how the trainer writes non-finite values
        ]
    )
    assert table.steps.tolist() == [1, 2, 3, 4]
    assert table.series("train/lm_loss")[0].tolist() == [1, 2, 3, 4]
    assert table.series("train/lm_loss", finite_only=True)[1].tolist() == [2.0, 1.25]
    assert math.isnan(table.last("train/lm_loss")) and table.last("train/grad_norm") == math.inf
    dense = table.column("eval/exact_accuracy")
    assert np.isnan(dense[[0, 2, 3]]).all() and dense[1] == 0.25
    assert "note" not in table and table.last("flag") == 1.0 and table.last("missing") is None


def test_read_metrics_file_errors_name_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "a": 1}\n{"step": 2, "a": \n{"step": 3, "a": 3}\n')
    with pytest.raises(RunLoadError, match=r"metrics.jsonl:2: not valid JSON"):
        read_metrics_file(path)
    path.write_text('{"step": 1, "a": 1}\n{"a": 2}\n')
    with pytest.raises(RunLoadError, match=r":2: every line needs an integer 'step'"):
        read_metrics_file(path)
    path.write_text('{"step": 1, "a": 1}\n{"step": 2, "a"')  # a run still writing its last line
    assert read_metrics_file(path).series("a")[1].tolist() == [1.0]


def test_labels_come_from_the_config(sweep: Path) -> None:
    gd = load_run_dir(sweep / "sweep" / "gd-s1")
    jd = load_run_dir(sweep / "sweep" / "mgda-s0")
    assert (gd.split, gd.aggregator, gd.seed, gd.arch, gd.data, gd.project) == ("none", "gd", 1, "trm", "sudoku-tiny", "sweep")
    assert (jd.split, jd.aggregator, jd.seed) == ("iwrm_with_q_halt_in", "mgda", 0)
    assert gd.final_step == 20 and gd.status == "finished"
    assert jd.final_step == 20 and jd.status == NO_SUMMARY  # no summary.json: largest logged step
    unnamed = load_run_dir(write_run(sweep, "unnamed", project="by-folder", project_in_config=False))
    assert unnamed.project == "by-folder"  # project_name unset: the run directory's parent folder


def test_load_runs_finds_runs_below_a_folder_and_skips_wandb_files(sweep: Path) -> None:
    runs = load_runs([sweep], progress=False)
    assert sorted(r.name for r in runs) == ["gd-s0", "gd-s1", "mgda-s0", "upgrad-s0", "upgrad-s1"]
    by_glob = load_runs([str(sweep / "sweep" / "upgrad-*"), str(sweep / "sweep" / "upgrad-s0" / "metrics.jsonl")], progress=False)
    assert [r.name for r in by_glob] == ["upgrad-s0", "upgrad-s1"]  # each run once
    groups = group_runs(runs, ("split", "aggregator"))
    assert list(groups) == [("none", "gd"), ("iwrm_with_q_halt_in", "mgda"), ("iwrm_with_q_halt_in", "upgrad")]


def test_load_runs_rejects_paths_without_runs(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunLoadError, match="no run directory .* found in or below"):
        load_runs([tmp_path / "empty"], progress=False)
    with pytest.raises(RunLoadError, match="no such file or directory"):
        load_runs([tmp_path / "missing"], progress=False)
    with pytest.raises(RunLoadError, match="no path matches the pattern"):
        load_runs([str(tmp_path / "nothing-*")], progress=False)
    with pytest.raises(RunLoadError, match="no runs given"):
        load_runs([], progress=False)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(RunLoadError, match="has metrics.jsonl but no config.yaml"):
        load_runs([broken], progress=False)


def test_parse_label_fields_names_accepted_values() -> None:
    assert parse_label_fields("split, aggregator") == ("split", "aggregator")
    with pytest.raises(AnalysisError, match="accepted: split, method, aggregator, seed"):
        parse_label_fields("split,optimizer")
    assert parse_label_fields("method, lr, arch.H_cycles") == ("method", "lr", "arch.H_cycles")  # a sweep's hyperparameters


def test_runs_group_by_a_config_key(sweep: Path) -> None:
    runs = load_runs([sweep / "sweep"], progress=False)
    groups = group_runs(runs, ("jd.aggregator",))
    assert {key[0] for key in groups} == {str(run.config["jd"]["aggregator"]) for run in runs} and len(groups) >= 2


# ----------------------------------------------------------------------------------------------- curves


def test_moving_average_is_a_trailing_mean() -> None:
    values = np.array([1.0, 3.0, 2.0, 6.0, 4.0])
    assert np.array_equal(moving_average(values, 1), values)
    expected = [np.mean(values[max(0, i - 2) : i + 1]) for i in range(values.size)]
    assert np.allclose(moving_average(values, 3), expected)
    assert np.allclose(moving_average(values, 50), np.cumsum(values) / np.arange(1, 6))
    assert np.allclose(moving_average(np.full(7, 0.3), 4), 0.3)


def test_mean_curve_averages_runs_within_their_own_ranges(sweep: Path) -> None:
    runs = [load_run_dir(sweep / "sweep" / n) for n in ("upgrad-s0", "upgrad-s1")]
    curve = mean_curve("upgrad", runs, "jd/gd_similarity")
    a, b = (np.array(jsonl_series(sweep / "sweep" / n, "jd/gd_similarity")) for n in ("upgrad-s0", "upgrad-s1"))
    assert curve.n_runs == 2 and curve.steps.tolist() == list(range(1, 21))
    assert np.allclose(curve.mean, (a + b) / 2) and np.allclose(curve.std, np.abs(a - b) / 2)
    short = write_run(sweep, "short", split="iwrm_with_q_halt_in", seed=2, steps=10)
    curve3 = mean_curve("upgrad", runs + [load_run_dir(short)], "jd/gd_similarity")
    c = np.array(jsonl_series(short, "jd/gd_similarity"))
    assert np.allclose(curve3.mean[:10], (a[:10] + b[:10] + c) / 3)
    assert np.allclose(curve3.mean[10:], (a[10:] + b[10:]) / 2)


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


# ----------------------------------------------------------------------------------------------- compare


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


@pytest.mark.slow
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


# ----------------------------------------------------------------------------------------------- W&B


def test_parse_wandb_source_forms() -> None:
    assert parse_wandb_source("wandb:me/proj").run_id is None
    assert parse_wandb_source("wandb:me/proj/abc123").run_id == "abc123"
    assert parse_wandb_source("wandb:me/proj@sweep1").group == "sweep1"
    with pytest.raises(ValueError, match="accepted: wandb:ENTITY/PROJECT"):
        parse_wandb_source("wandb:just-a-project")


def test_wandb_guards_fail_fast_with_what_to_do(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    assert find_wandb_credentials({"HOME": str(home)}) is None
    reason = wandb_unavailable_reason({"HOME": str(home)})
    assert reason is not None and "not logged in" in reason
    (home / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    assert find_wandb_credentials({"HOME": str(home)}) == str(home / ".netrc")
    assert "offline mode" in wandb_unavailable_reason({"HOME": str(home), "WANDB_MODE": "offline"})
    closed = {"WANDB_API_KEY": "x" * 40, "WANDB_BASE_URL": "http://127.0.0.1:9"}
    started = time.monotonic()
    with pytest.raises(WandbUnavailableError, match="cannot reach W&B at http://127.0.0.1:9"):
        ensure_wandb_available(closed, timeout_s=2.0)
    assert time.monotonic() - started < 5.0


def test_wandb_source_while_offline_names_the_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    with pytest.raises(WandbUnavailableError, match="WANDB_MODE=offline.*wandb login"):
        load_runs(["wandb:me/proj@sweep1"], progress=False)


def test_run_from_history_uses_wandb_steps() -> None:
    run = run_from_history(
        "r",
        "wandb:me/p/id1",
        {"jd": {"split": "iwrm", "aggregator": "upgrad"}, "seed": 3},
        [{"_step": 0, "_runtime": 1.0, "train/lm_loss": 2.0}, {"_step": 1, "jd/gd_similarity": 0.9}, {"no_step": 1}],
    )
    assert run.metrics.steps.tolist() == [0, 1] and "_runtime" not in run.metrics
    assert (run.split, run.aggregator, run.seed) == ("iwrm", "upgrad", 3)


# ----------------------------------------------------------------------------------------------- end to end


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


@pytest.mark.slow
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


def test_a_sweep_mixing_aggregators_and_scalarizers_groups_them_by_method(tmp_path: Path) -> None:
    runs = []
    for method, seed in (("upgrad", 0), ("famo", 0), ("famo", 1), ("uw", 0)):
        jd = {"split": "iwrm_with_q_halt_in", **({"aggregator": method} if method == "upgrad" else {"scalarizer": method})}
        runs.append(run_from_history(f"{method}-{seed}", "local", {"jd": jd, "seed": seed}, [{"step": 1, "train/lm_loss": 1.0}]))
    groups = group_runs(runs, DEFAULT_GROUP_BY)
    assert [key[1] for key in groups] == ["aggregator:upgrad", "scalarizer:famo", "scalarizer:uw"]
    assert len(groups[("iwrm_with_q_halt_in", "scalarizer:famo")]) == 2


def test_archived_runs_with_gzipped_metrics_read_the_same(sweep: Path, tmp_path: Path) -> None:
    import gzip
    import shutil

    source = sweep / "sweep" / "upgrad-s0"
    archived = tmp_path / "archive" / "upgrad-s0"
    shutil.copytree(source, archived, ignore=shutil.ignore_patterns("wandb", "metrics.jsonl"))
    (archived / "metrics.jsonl.gz").write_bytes(gzip.compress((source / "metrics.jsonl").read_bytes()))
    plain, packed = load_run_dir(source), load_runs([tmp_path / "archive"], progress=False)[0]
    for key in ("eval/exact_accuracy", "jd/gd_similarity", "train/lm_loss"):
        assert np.array_equal(plain.metrics.series(key)[1], packed.metrics.series(key)[1])
    (archived / "metrics.jsonl.gz").write_bytes(b"not gzip")
    with pytest.raises(RunLoadError, match="not a readable gzip file"):
        load_run_dir(archived)
    packed_bytes = gzip.compress((source / "metrics.jsonl").read_bytes())
    (archived / "metrics.jsonl.gz").write_bytes(packed_bytes[:20] + bytes(40) + packed_bytes[60:])  # a corrupt deflate stream
    with pytest.raises(RunLoadError, match="not a readable gzip file"):
        load_run_dir(archived)
    (archived / "metrics.jsonl.gz").unlink()
    (archived / "metrics.jsonl").write_bytes(b'{"step": 1, "train/lm_loss": 1.0}\n\xff\xfe\n')
    with pytest.raises(RunLoadError, match="not UTF-8"):
        load_run_dir(archived)
