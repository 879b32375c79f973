"""analysis.study: a real (tiny) grid of arms x seeds, its report, and resuming a half-finished study.

The integration tests; the others are in
tests/unit/test_study.py.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from analysis.study import RECIPES, plan_runs, run_status
from analysis.study import main as study_main

TINY = [
    "arch.hidden_size=32",
    "arch.num_heads=2",
    "arch.expansion=2",
    "arch.L_layers=1",
    "arch.H_cycles=2",
    "arch.L_cycles=1",
    "arch.halt_max_steps=3",
    "global_batch_size=16",
    "max_steps=3",
    "eval_max_batches=1",
    "lr_warmup_steps=1",
]


def _args(out: Path, *extra: str) -> list[str]:
    args = ["--recipe", "sudoku4x4", "--out", str(out), "--arms", "gd,iwrm_upgrad", "--seeds", "0,1", "--threads", "1", *extra]
    for item in TINY:
        args += ["--set", item]
    return args


def test_every_recipe_arm_is_a_valid_config(tmp_path: Path) -> None:
    from tests.conftest import compose

    recipe = RECIPES["sudoku4x4"]
    runs = plan_runs(recipe, tmp_path, seeds=[3])
    assert [r.arm.name for r in runs] == [a.name for a in recipe.arms] and len(runs) == 10
    labels = set()
    for run in runs:
        config = compose([o for o in run.overrides if not o.startswith("data_paths=")])
        labels.add((config.jd.split, config.jd.aggregator, config.jd.scalarizer, config.epochs))
        assert config.seed == 3 and Path(config.run_dir) == tmp_path / "runs" / run.arm.name / "s3"
    assert len(labels) == 10  # every arm differs from every other in what the report groups by


def test_study_runs_reports_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "study"
    assert study_main(_args(out, "--workers", "2")) == 0
    runs = plan_runs(RECIPES["sudoku4x4"], out, ["gd", "iwrm_upgrad"], [0, 1])
    assert all(run_status(r.run_dir) == "finished" for r in runs)
    report = out / "report"
    with open(report / "differences.csv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["outcome"] == "final_eval_exact_accuracy"]
    assert [(r["split"], r["test"], r["n"]) for r in rows] == [("iwrm_with_q_halt_in", "paired", "2")]
    assert (report / "gd_similarity.png").is_file() and (report / "report.html").is_file()

    # A run that stopped after its checkpoint (no summary yet) continues; finished ones are left alone.
    stopped, untouched = runs[1].run_dir, runs[0].run_dir
    (stopped / "summary.json").unlink()
    before = (untouched / "metrics.jsonl").read_bytes(), (untouched / "summary.json").stat().st_mtime_ns
    assert study_main(_args(out)) == 0
    assert run_status(stopped) == "finished"
    assert ((untouched / "metrics.jsonl").read_bytes(), (untouched / "summary.json").stat().st_mtime_ns) == before
    # It continued from its step-3 checkpoint: a fresh start would have logged steps 1-3 a second time.
    records = [json.loads(line) for line in (stopped / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if "train/lm_loss" in r]
    assert sorted(train_steps) == [1, 2, 3]
