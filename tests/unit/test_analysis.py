"""Tests for analysis/: reading runs, the GD-similarity plot, the comparison table and report, W&B guards.

This file holds the unit tests; the others are in tests/integration/test_analysis.py.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest

from analysis.plot_gd_similarity import mean_curve, moving_average
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
from tests.helpers.analysis import (
    jsonl_series,
    write_run,
)


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


def test_a_method_has_one_colour_in_every_figure_and_legends_stay_off_the_curves(sweep: Path) -> None:
    """The learning curves (all runs) and the GD-similarity figure (JD runs only: GD is skipped) give
    IWRM + UPGrad the same colour; the GD-similarity legend sits outside the axes."""
    from analysis.compare import learning_curves_figure
    from analysis.plot_gd_similarity import build_curves, gd_similarity_figure, group_colors, split_by_metric

    runs = load_runs([sweep], progress=False)
    group_by = ("split", "aggregator")

    def colours(figure: object) -> dict[str, str]:
        lines = [line for ax in figure.axes for line in ax.get_lines()]  # type: ignore[attr-defined]
        return {line.get_label().split(" (n=")[0]: line.get_color() for line in lines if not line.get_label().startswith("_")}

    curves_figure = learning_curves_figure(runs, group_by)
    jd_runs, skipped = split_by_metric(runs, "jd/gd_similarity")
    assert skipped  # the GD runs: a colour index over JD runs alone would shift every method's colour
    similarity = gd_similarity_figure(build_curves(jd_runs, "jd/gd_similarity", group_by=group_by), colors=group_colors(runs, group_by))
    shared = {"iwrm_with_q_halt_in / upgrad", "iwrm_with_q_halt_in / mgda"}
    assert {name: colours(curves_figure)[name] for name in shared} == {name: colours(similarity)[name] for name in shared}
    assert len({colours(similarity)[name] for name in shared}) == 2
    assert similarity.axes[0].get_legend() is None and len(similarity.legends) == 1


def test_a_band_past_the_metrics_range_is_clipped_and_the_title_says_so() -> None:
    from matplotlib.figure import Figure

    from analysis.plot_gd_similarity import Curve, draw_curves

    steps = np.arange(1, 6)
    curve = Curve(key="a", label="a (n=2)", steps=steps, mean=np.full(5, 0.9), std=np.full(5, 0.3), n_runs=2)
    ax = Figure().add_subplot()
    assert draw_curves(ax, [curve], band=True, ylabel="eval/exact_accuracy")
    band = ax.collections[0].get_paths()[0].vertices[:, 1]
    assert band.max() <= 1.0 and band.min() == pytest.approx(0.6)
    assert not draw_curves(Figure().add_subplot(), [curve], band=True, ylabel="train/lm_loss")  # no range known: unclipped


def test_the_epochs_label_says_when_max_steps_bounded_the_run(tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    run_dir = write_run(tmp_path / "runs", "short")
    config = OmegaConf.load(run_dir / "config.yaml")
    config.epochs = 18
    OmegaConf.save(config, run_dir / "config.yaml")
    (run,) = load_runs([run_dir], progress=False)
    assert run.label("epochs") == "18, max_steps=20"
    config.max_steps = None
    OmegaConf.save(config, run_dir / "config.yaml")
    assert load_runs([run_dir], progress=False)[0].label("epochs") == "18"
