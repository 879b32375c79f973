"""End-to-end: real tiny trainings on CPU through the same code path as ``pretrain.py``.

The integration tests; the others are in
tests/unit/test_training.py,
tests/distributed/test_training.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pretrain import run
from tests.conftest import REPO, compose, tiny_overrides
from training.checkpoint import CheckpointError, list_checkpoints, load_checkpoint
from training.config import ConfigError
from training.run_dir import RunDirError


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_tiny_training_learns_and_writes_a_run_directory(sudoku_data: Path, tmp_path: Path) -> None:
    config = compose(tiny_overrides(sudoku_data, tmp_path, epochs=12, eval_interval=6, lr=3e-3, run_name="learn"))
    summary = run(config)
    run_dir = Path(summary["run_dir"])
    assert run_dir == tmp_path / "sudoku4" / "learn"
    assert summary["status"] == "finished" and summary["final_step"] > 20
    for name in ("config.yaml", "metrics.jsonl", "summary.json"):
        assert (run_dir / name).is_file(), name
    records = read_metrics(run_dir)
    train = [r for r in records if "train/lm_loss" in r]
    assert {"train/lm_loss", "train/lr", "train/step_time_s", "train/halted_count"} <= set(train[0])
    halting_steps = [r for r in train if r["train/halted_count"] > 0]
    assert halting_steps and all({"train/accuracy", "train/exact_accuracy", "train/steps"} <= set(r) for r in halting_steps)
    assert all("train/accuracy" not in r for r in train if r["train/halted_count"] == 0)
    first, last = sum(r["train/lm_loss"] for r in train[:5]) / 5, sum(r["train/lm_loss"] for r in train[-5:]) / 5
    assert last < 0.8 * first, f"LM loss should fall: {first:.3f} -> {last:.3f}"
    evals = [r for r in records if "eval/exact_accuracy" in r]
    assert len(evals) == 2 and "eval/exact_accuracy_ci_low" in evals[-1]
    checkpoint = load_checkpoint(list_checkpoints(run_dir)[-1])
    assert checkpoint["progress"]["step"] == summary["final_step"]
    assert {"model", "optimizer", "sparse_optimizer", "ranks", "config"} <= set(checkpoint)


def test_resume_reproduces_an_uninterrupted_run(sudoku_data: Path, tmp_path: Path) -> None:
    overrides = tiny_overrides(sudoku_data, tmp_path, max_steps=8, checkpoint_interval=4, keep_last=10, eval_interval=100, run_name="resume")
    summary = run(compose(overrides))
    run_dir = Path(summary["run_dir"])
    uninterrupted = load_checkpoint(list_checkpoints(run_dir)[-1])
    reference_metrics = [r for r in read_metrics(run_dir) if "train/lm_loss" in r]
    # Pretend the run died after step 4: resume from that checkpoint (in the same run directory).
    for later in list_checkpoints(run_dir)[1:]:
        later.unlink()
    run(compose(overrides + [f"load_checkpoint={run_dir / 'checkpoints' / 'step_00000004.pt'}"]))
    resumed = load_checkpoint(list_checkpoints(run_dir)[-1])
    assert resumed["progress"]["step"] == 8
    for key, value in uninterrupted["model"].items():
        assert torch.equal(resumed["model"][key], value), key
    resumed_metrics = [r for r in read_metrics(run_dir) if "train/lm_loss" in r]
    assert [r["step"] for r in resumed_metrics] == list(range(1, 9))
    for a, b in zip(reference_metrics, resumed_metrics):
        assert a["train/lm_loss"] == b["train/lm_loss"] and a.get("train/accuracy") == b.get("train/accuracy")


def test_gradient_accumulation_matches_the_full_batch(sudoku_data: Path, tmp_path: Path) -> None:
    common = dict(max_steps=3, eval_interval=100, **{"arch.halt_exploration_prob": 0.0})
    full = run(compose(tiny_overrides(sudoku_data, tmp_path, run_name="full", **common)))
    accumulated = run(compose(tiny_overrides(sudoku_data, tmp_path, run_name="accum", grad_accum_steps=2, **common)))
    a = load_checkpoint(list_checkpoints(Path(full["run_dir"]))[-1])["model"]
    b = load_checkpoint(list_checkpoints(Path(accumulated["run_dir"]))[-1])["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)


def test_bad_input_stops_before_training(sudoku_data: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="divisible"):
        run(compose(tiny_overrides(sudoku_data, tmp_path, grad_accum_steps=3)))
    with pytest.raises(ConfigError, match="arch.hidden_size"):
        compose(tiny_overrides(sudoku_data, tmp_path, **{"arch.hidden_size": "big"}))
    with pytest.raises(ConfigError, match="unknown key"):
        compose(tiny_overrides(sudoku_data, tmp_path) + ["+learning_rate=1"])
    with pytest.raises(ConfigError, match="jd.split"):
        run(compose(tiny_overrides(sudoku_data, tmp_path, **{"jd.split": "nonsense"})))
    from dataset.common import DatasetError

    with pytest.raises(DatasetError, match="does not exist"):
        run(compose(tiny_overrides(tmp_path / "missing", tmp_path)))
    # An existing run directory is never reused by a new run.
    existing = tmp_path / "sudoku4" / "taken"
    existing.mkdir(parents=True)
    (existing / "metrics.jsonl").write_text("keep me\n")
    with pytest.raises(RunDirError, match="already exists"):
        run(compose(tiny_overrides(sudoku_data, tmp_path, run_name="taken")))
    assert (existing / "metrics.jsonl").read_text() == "keep me\n"
    # Unreadable and foreign checkpoints.
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="unreadable"):
        run(compose(tiny_overrides(sudoku_data, tmp_path, load_checkpoint=bad)))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"jd.aggregator": "upgard"}, "did you mean upgrad"),  # a typo, without a split: never GD in silence
        ({"jd.aggregator": "mgda"}, "jd.split=none is plain gradient descent"),
        ({"jd.scalarizer": "famo"}, "jd.split=none is plain gradient descent"),
        ({"jd.scalarizer": "uww"}, "did you mean uw"),
        ({"jd.split": "iwrm_with_q_halt_in", "jd.aggregator": "upgard"}, "did you mean upgrad"),  # with a split too
        # sizes are known before training: checked there, not at step 1 (nothing is left behind)
        ({"jd.split": "lm_loss_vs_q_halt_loss", "jd.aggregator": "krum", "jd.aggregator_kwargs": "{n_byzantine: 1}"}, "m=2 objectives"),
        ({"jd.split": "lm_loss_vs_q_halt_loss", "jd.aggregator": "trimmed_mean", "jd.aggregator_kwargs": "{trim_number: 1}"}, "m=2"),
        ({"jd.split": "lm_loss_vs_q_halt_loss", "jd.aggregator": "constant", "jd.aggregator_kwargs": "{weights: [1, 2, 3]}"}, "sized for 3"),
        ({"jd.split": "lm_loss_vs_q_halt_loss", "jd.scalarizer": "constant", "jd.scalarizer_kwargs": "{weights: [1, 2, 3]}"}, "m=2"),
    ],
)
def test_a_misspelt_or_unused_method_name_is_refused_before_training(
    sudoku_data: Path, tmp_path: Path, overrides: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        run(compose(tiny_overrides(sudoku_data, tmp_path, **overrides)))
    assert not (tmp_path / "sudoku4").exists()  # nothing was created


def test_checkpoint_of_another_model_is_rejected(sudoku_data: Path, tmp_path: Path) -> None:
    summary = run(compose(tiny_overrides(sudoku_data, tmp_path, max_steps=2, run_name="small")))
    with pytest.raises(CheckpointError, match="does not fit"):
        run(compose(tiny_overrides(sudoku_data, tmp_path, **{"arch.hidden_size": 64, "load_checkpoint": summary["run_dir"]})))


def test_cli_prints_a_one_line_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "pretrain.py", f"data_paths=[{tmp_path / 'nothing'}]", "wandb.mode=disabled", "device=cpu"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error:") and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_jd_run_logs_diagnostics_and_engines_agree(sudoku_data: Path, tmp_path: Path) -> None:
    """A real IWRM + UPGrad run: the per-sample engine and the Jacobian engine take the same steps."""
    common = dict(max_steps=3, eval_interval=100, grad_accum_steps=2, **{"arch.halt_exploration_prob": 0.0, "jd.split": "iwrm_with_q_halt_in"})
    fast = run(compose(tiny_overrides(sudoku_data, tmp_path, run_name="per-sample", **common)))
    slow = run(compose(tiny_overrides(sudoku_data, tmp_path, run_name="gramian", **{**common, "jd.engine": "gramian"})))
    records = [r for r in read_metrics(Path(fast["run_dir"])) if "train/lm_loss" in r]
    assert {"jd/gd_similarity", "jd/num_objectives", "jd/conflict_fraction", "jd/weights_entropy"} <= set(records[-1])
    assert records[-1]["jd/num_objectives"] == 16 // 2, "m = B of one micro-batch"
    a = load_checkpoint(list_checkpoints(Path(fast["run_dir"]))[-1])["model"]
    b = load_checkpoint(list_checkpoints(Path(slow["run_dir"]))[-1])["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)


def test_wandb_offline_run_needs_no_account(sudoku_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default W&B mode: a real offline W&B run beside metrics.jsonl, no login, no network."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    summary = run(compose(tiny_overrides(sudoku_data, tmp_path, max_steps=3, run_name="wb", **{"wandb.mode": "offline"})))
    run_dir = Path(summary["run_dir"])
    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1, list((run_dir / "wandb").iterdir())
    run_id = (run_dir / "wandb_run_id.txt").read_text().strip()
    assert offline_runs[0].name.endswith(run_id)
    assert any(offline_runs[0].glob("*.wandb")), "the offline run holds its logged history"


def test_autogram_on_the_recursive_model_is_refused_before_the_run_starts(sudoku_data: Path, tmp_path: Path) -> None:
    overrides = tiny_overrides(sudoku_data, tmp_path, **{"jd.split": "iwrm_with_q_halt_in", "jd.engine": "autogram", "max_steps": 1})
    with pytest.raises(ConfigError, match="arch=trm with jd.split=iwrm_with_q_halt_in: jd.engine=autogram: module .* ran 2 times"):
        run(compose(overrides))
    assert not any(tmp_path.iterdir())  # no run directory was created
    summary = run(
        compose(
            tiny_overrides(
                sudoku_data, tmp_path, **{"arch": "transformer", "jd.split": "iwrm_with_q_halt_in", "jd.engine": "autogram", "max_steps": 2}
            )
        )
    )
    assert summary["status"] == "finished" and summary["final_step"] == 2


def test_a_missing_aggregator_solver_is_a_config_error(sudoku_data: Path, tmp_path: Path) -> None:
    try:
        import cvxpy  # noqa: F401

        pytest.skip("cvxpy is installed, so nash_mtl's missing-solver error cannot be triggered")
    except ImportError:
        pass
    with pytest.raises(ConfigError, match=r"jd.aggregator=nash_mtl needs optional packages .* pip install 'torchjd\[nash_mtl\]'"):
        run(compose(tiny_overrides(sudoku_data, tmp_path, **{"jd.split": "lm_loss_vs_q_halt_loss", "jd.aggregator": "nash_mtl"})))


def test_vmap_rows_with_a_compiled_model_are_refused_before_compute(sudoku_data: Path, tmp_path: Path) -> None:
    overrides = tiny_overrides(sudoku_data, tmp_path, **{"compile": "true", "jd.split": "pixelwise_q_halt_in", "jd.parallel_chunk_size": "null"})
    with pytest.raises(ConfigError, match=r"jd.parallel_chunk_size=None batches Jacobian rows with torch.vmap, which cannot run a compiled backward"):
        run(compose(overrides))
    assert not any(tmp_path.iterdir())


def test_eval_steps_add_early_evaluations(sudoku_data: Path, tmp_path: Path) -> None:
    summary = run(compose(tiny_overrides(sudoku_data, tmp_path, run_name="early", max_steps=5, eval_interval=100, eval_steps="[2]")))
    records = [json.loads(line) for line in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval/exact_accuracy" in r] == [2, 5]  # the early one, then the final one
    assert compose(tiny_overrides(sudoku_data, tmp_path)).eval_steps == [150]  # the demo's default
    assert compose([*tiny_overrides(sudoku_data, tmp_path), "experiment=maze"]).eval_steps == []


def test_online_wandb_without_a_login_is_one_line(sudoku_data: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path), OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "pretrain.py", f"data_paths=[{sudoku_data}]", "wandb.mode=online", f"runs_root={tmp_path / 'runs'}", "device=cpu"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: wandb.mode=online needs a W&B login"), result.stderr


def test_resuming_a_finished_run_repeats_nothing(sudoku_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """No second final evaluation in metrics.jsonl, no rewritten checkpoint, the same evaluation in summary.json."""
    import hashlib

    overrides = tiny_overrides(sudoku_data, tmp_path, max_steps=3, eval_interval="null", run_name="done")
    first = run(compose(overrides))
    run_dir = Path(first["run_dir"])
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in list_checkpoints(run_dir)}
    metrics = (run_dir / "metrics.jsonl").read_text()
    capsys.readouterr()
    again = run(compose(overrides + ["resume=true"]))
    assert "already finished at step 3" in capsys.readouterr().out
    assert (run_dir / "metrics.jsonl").read_text() == metrics
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in list_checkpoints(run_dir)} == before
    assert again["status"] == "finished" and again["eval"] == first["eval"] and again["final_step"] == 3


def test_a_run_directory_in_use_is_not_resumed_by_a_second_process(sudoku_data: Path, tmp_path: Path) -> None:
    """resume=true while another live process holds the run (a Slurm requeue while the old job runs, a command
    started twice) is refused; once that process is gone (killed: its lock goes with it), the resume works."""
    import signal
    import subprocess
    import sys
    import time

    overrides = tiny_overrides(sudoku_data, tmp_path, max_steps=2, eval_interval="null", run_name="busy")
    first = run(compose(overrides))
    run_dir = Path(first["run_dir"])
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; from training.run_lock import RunLock; "
            f"lock = RunLock.acquire({str(run_dir)!r}); print('held', flush=True); time.sleep(60)",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        metrics = (run_dir / "metrics.jsonl").read_text()
        with pytest.raises(RunDirError, match="in use by a training process that is still running"):
            run(compose(tiny_overrides(sudoku_data, tmp_path, max_steps=4, eval_interval="null", run_name="busy") + ["resume=true"]))
        assert (run_dir / "metrics.jsonl").read_text() == metrics  # nothing written
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    time.sleep(0.1)
    resumed = run(compose(tiny_overrides(sudoku_data, tmp_path, max_steps=4, eval_interval="null", run_name="busy") + ["resume=true"]))
    assert resumed["final_step"] == 4


def test_a_run_directory_left_while_starting_is_taken_over_by_the_same_command(sudoku_data: Path, tmp_path: Path) -> None:
    left = tmp_path / "sudoku4" / "started"
    (left / "checkpoints").mkdir(parents=True)
    (left / ".claimed").touch()
    (left / "metrics.jsonl").touch()
    summary = run(compose(tiny_overrides(sudoku_data, tmp_path, max_steps=2, eval_interval="null", run_name="started")))
    assert summary["status"] == "finished" and Path(summary["run_dir"]) == left
    (left / "metrics.jsonl").write_text("a step\n")
    with pytest.raises(RunDirError, match="already exists"):  # a directory holding work is never taken over
        run(compose(tiny_overrides(sudoku_data, tmp_path, max_steps=2, eval_interval="null", run_name="started")))
