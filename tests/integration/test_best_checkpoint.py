"""The best checkpoint (``checkpoint_best``): kept beside the newest ones, resumed exactly, used by
``analysis.evaluate RUN`` and ``init_from=RUN``; real tiny trainings on CPU."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from analysis.evaluate import main as evaluate_main
from pretrain import run
from tests.conftest import compose, tiny_overrides
from tests.helpers.reliability import assert_identical, kill_after_checkpoint, read_records
from training.checkpoint import list_checkpoints, load_checkpoint
from training.config import ConfigError


def evaluations(run_dir: Path, key: str) -> list[tuple[int, float]]:
    return [(record["step"], record[key]) for record in read_records(run_dir) if key in record]


def best_of(values: list[tuple[int, float]], mode: str) -> tuple[int, float]:
    """The first step holding the best value (a later tie does not replace it)."""
    best = values[0]
    for step, value in values[1:]:
        if (value > best[1]) if mode == "max" else (value < best[1]):
            best = (step, value)
    return best


def evaluate_json(*args: str) -> dict:
    out = Path(args[args.index("--out") + 1])
    assert evaluate_main([*args, "--device", "cpu", "--quiet"]) == 0
    return json.loads((out / "metrics.json").read_text())


def test_a_peak_before_the_end_is_kept_as_best_beside_the_last_checkpoint(
    sudoku_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The held-out loss falls as the model learns, so its maximum is a peak early in the run.
    overrides = tiny_overrides(
        sudoku_data, tmp_path, max_steps=10, eval_steps="[2,4,6,8]", keep_last=1, lr=3e-3, run_name="peak",
        checkpoint_best="eval/lm_loss", checkpoint_best_mode="max",
    )  # fmt: skip
    summary = run(compose(overrides))
    run_dir = Path(summary["run_dir"])
    step, value = best_of(evaluations(run_dir, "eval/lm_loss"), "max")
    assert step < summary["final_step"], "the test needs a peak before the end"
    assert summary["best"] == {
        "metric": "eval/lm_loss",
        "mode": "max",
        "weights": {"step": step, "value": value, "path": str(run_dir / "checkpoints" / "best.pt")},
    }
    assert [path.name for path in list_checkpoints(run_dir)] == [f"step_{summary['final_step']:08d}.pt"], "keep_last=1 pruned the rest"
    best = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    assert best["step"] == step and best["progress"]["eval_pending"] == 0
    assert best["best"]["records"]["weights"] == {"step": step, "value": value}

    # analysis.evaluate RUN evaluates the best checkpoint, says so, and gets the value logged for it.
    capsys.readouterr()
    record = evaluate_json(str(run_dir), "--out", str(tmp_path / "best-eval"))
    assert record["step"] == step and record["checkpoint"].endswith("best.pt")
    assert record["metrics"]["eval/lm_loss"] == pytest.approx(value, rel=1e-9)
    assert f"its best checkpoint, best.pt (step {step}, eval/lm_loss = " in capsys.readouterr().err
    newest = evaluate_json(str(run_dir), "--last", "--out", str(tmp_path / "last-eval"))
    assert newest["step"] == summary["final_step"]

    # init_from=RUN starts from the best weights.
    capsys.readouterr()
    fine_tuned = run(compose(tiny_overrides(sudoku_data, tmp_path, max_steps=1, run_name="from-best", init_from=str(run_dir))))
    assert "best.pt" in capsys.readouterr().out
    assert fine_tuned["status"] == "finished"


def test_a_killed_run_resumes_with_the_same_best(sudoku_data: Path, tmp_path: Path) -> None:
    common = dict(max_steps=12, eval_steps="[2,3,4,5,6,7,8,9,10,11]", checkpoint_interval=1, keep_last=20, lr=3e-3)
    reference = Path(run(compose(tiny_overrides(sudoku_data, tmp_path, run_name="reference", **common)))["run_dir"])
    args = tiny_overrides(sudoku_data, tmp_path, run_name="killed", **common)
    run_dir = tmp_path / "sudoku4" / "killed"
    kill_after_checkpoint(args, run_dir, 6)
    summary = run(compose(args + [f"load_checkpoint={run_dir}"]))
    assert summary["best"]["weights"]["step"] == json.loads((reference / "summary.json").read_text())["best"]["weights"]["step"]
    assert read_records(run_dir) == read_records(reference)
    a, b = (load_checkpoint(folder / "checkpoints" / "best.pt") for folder in (reference, run_dir))
    a.pop("config"), b.pop("config")
    assert_identical(a, b, "best.pt")


def test_a_kill_after_an_evaluation_before_its_best_is_written_is_mended_on_resume(sudoku_data: Path, tmp_path: Path) -> None:
    common = dict(max_steps=8, eval_steps="[2,4,6]", keep_last=20, checkpoint_best="eval/lm_loss", checkpoint_best_mode="max")
    reference = Path(run(compose(tiny_overrides(sudoku_data, tmp_path, run_name="reference", **common)))["run_dir"])
    best_step = json.loads((reference / "summary.json").read_text())["best"]["weights"]["step"]
    assert best_step < 8
    assert load_checkpoint(reference / "checkpoints" / f"step_{best_step:08d}.pt")["progress"]["eval_pending"] == 1, "best.pt is its own file"
    # The state of a run killed right after the best step's evaluation, before best.pt was written.
    run_dir = tmp_path / "sudoku4" / "killed"
    shutil.copytree(reference, run_dir)
    (run_dir / "checkpoints" / "best.pt").unlink()
    for later in list_checkpoints(run_dir):
        if int(later.stem.removeprefix("step_")) > best_step:
            later.unlink()
    run(compose(tiny_overrides(sudoku_data, tmp_path, run_name="killed", resume="true", **common)))
    copy = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    assert copy["step"] == best_step
    for key, value in load_checkpoint(reference / "checkpoints" / "best.pt")["model"].items():
        assert torch.equal(copy["model"][key], value), key


def test_with_ema_both_weights_keep_their_best(sudoku_data: Path, tmp_path: Path) -> None:
    overrides = tiny_overrides(sudoku_data, tmp_path, max_steps=6, eval_steps="[2,4]", lr=3e-3, ema="true", ema_rate=0.5, run_name="ema")
    summary = run(compose(overrides))
    run_dir = Path(summary["run_dir"])
    for kind, key, file_name in (("ema", "eval/exact_accuracy", "best.pt"), ("raw", "raw/eval/exact_accuracy", "best_raw.pt")):
        step, value = best_of(evaluations(run_dir, key), "max")
        assert summary["best"][kind] == {"step": step, "value": value, "path": str(run_dir / "checkpoints" / file_name)}
        record = evaluate_json(str(run_dir / "checkpoints" / file_name), "--out", str(tmp_path / kind))
        assert record["ema"] is (kind == "ema") and record["step"] == step
        assert record["metrics"]["eval/exact_accuracy"] == pytest.approx(value, rel=1e-9)
    # checkpoint_best_raw=false: one evaluation per step, one best.
    lean = run(compose(overrides[:-1] + ["run_name=lean", "checkpoint_best_raw=false"]))
    assert set(lean["best"]) == {"metric", "mode", "ema"}
    assert not any(key.startswith("raw/") for record in read_records(Path(lean["run_dir"])) for key in record)


def test_a_metric_the_evaluation_does_not_log_is_refused_before_training(sudoku_data: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"checkpoint_best=eval/exact_acc: not a metric.*eval/exact_accuracy"):
        run(compose(tiny_overrides(sudoku_data, tmp_path, checkpoint_best="eval/exact_acc")))
    with pytest.raises(ConfigError, match=r"checkpoint_best \(the objective, ARC/pass@2\).*checkpoint_best=false"):
        run(compose(tiny_overrides(sudoku_data, tmp_path, objective="ARC/pass@2")))
    assert not (tmp_path / "sudoku4").exists(), "nothing written before the refusal"
    off = run(compose(tiny_overrides(sudoku_data, tmp_path, max_steps=2, objective="ARC/pass@2", checkpoint_best="false", run_name="off")))
    assert off["best"] == {}
    assert not (Path(off["run_dir"]) / "checkpoints" / "best.pt").exists()
