"""Fault injection on CPU: killed and interrupted runs, restarts, non-finite steps and bad input.

Every test trains a real tiny TRM (``tests/conftest.py``) through the code path of ``pretrain.py``,
in-process or as a real subprocess, injects a fault with real means (SIGKILL, SIGTERM, SIGINT, a
killed ``torchrun`` worker, a NaN parameter, a too large learning rate, damaged files) and checks
the stated outcome, and that no file a user already had was lost or overwritten.

Exactness: a resumed run must reach the same checkpoint (model, optimizers, EMA, progress, RNG
streams, ACT carries, JD state) and log the same metrics as an uninterrupted one, bit for bit on CPU
with one thread (``torch.set_num_threads(1)`` here, ``OMP_NUM_THREADS=1`` in subprocesses).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pytest
import torch

from pretrain import main, run
from tests.conftest import REPO, compose, tiny_overrides
from training.checkpoint import list_checkpoints, load_checkpoint
from training.config import ConfigError
from training.distributed import DistInfo, ElasticInfo
from training.interrupt import StopSignals
from training.run_dir import plan_run
from training.trainer import NonFiniteError, Trainer

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


# ------------------------------------------------------------------------------------ helpers
def file_hashes(root: Path) -> dict[str, str]:
    """SHA-256 of every file under ``root`` (W&B's own folder and the run lock's holder note excluded), by relative path."""
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file() and "wandb" not in path.parts and path.name != ".lock"
    }


def assert_files_kept(before: dict[str, str], root: Path, allow_changed: tuple[str, ...] = ()) -> None:
    """Every file of ``before`` still exists under ``root`` with the same content (except ``allow_changed``)."""
    after = file_hashes(root)
    lost = sorted(set(before) - set(after))
    changed = sorted(name for name in before if name in after and after[name] != before[name] and name not in allow_changed)
    assert not lost and not changed, f"lost {lost}, overwritten {changed}"


WALL_CLOCK_KEYS = frozenset({"train/step_time_s", "train/data_wait_s"})


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    """``metrics.jsonl`` without the wall-clock timings (the only values that may differ between runs)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in record.items() if k not in WALL_CLOCK_KEYS} for record in records]


def assert_identical(a: Any, b: Any, where: str = "state") -> None:
    """Recursive bitwise equality of checkpoint contents (tensors, dicts, lists, numbers, strings)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())), (
            where
        )
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(set(a) ^ set(b))}"
        for key in a:
            assert_identical(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{index}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_training_state(run_a: Path, run_b: Path, count_evaluations: bool = True) -> None:
    """The newest checkpoints of two runs hold the same training state (their configs may differ in run_dir)."""
    a, b = (load_checkpoint(list_checkpoints(run)[-1]) for run in (run_a, run_b))
    for state in (a, b):
        state.pop("config")
        if not count_evaluations:
            state["progress"].pop("evaluations")
    assert_identical(a, b)


def subprocess_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHELASTIC_") and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def start_pretrain(args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "pretrain.py", *args], cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_for(condition: Any, process: subprocess.Popen[str], timeout: float = 120.0) -> None:
    """Poll ``condition()`` every few milliseconds until it holds; fail if the process ends first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            out, err = process.communicate()
            pytest.fail(f"the training process ended (rc={process.returncode}) before the fault was injected:\n{out[-2000:]}\n{err[-2000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("timed out waiting for the training process")
        time.sleep(0.003)


def kill_after_checkpoint(args: list[str], run_dir: Path, step: int) -> None:
    """Start ``pretrain.py ARGS`` and SIGKILL it as soon as the checkpoint of ``step`` exists."""
    process = start_pretrain(args)
    wait_for(lambda: (run_dir / "checkpoints" / f"step_{step:08d}.pt").exists(), process)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL


def logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run ``pretrain.py ARGS`` in this process; return ``(exit status, stdout, stderr)``."""
    capsys.readouterr()
    status = main(args)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_one_line_error(err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"


# ------------------------------------------------------------------------------- exact resume
RESUME_CASES = {
    # GD with EMA, two micro-batches (two ACT carries) and evaluations in the middle (eval_interval=1).
    "gd-ema-accum": {"ema": True, "grad_accum_steps": 2},
    # JD with random bucketing of the objectives (the JD step's generator must resume too).
    "jd-pixelwise-groups": {"jd.split": "pixelwise_q_halt_in", "jd.n_groups": 4, "jd.aggregator": "upgrad"},
    # The JD study's supervision stack (one batch per step, until all halted) with its hard-example sampling:
    # the counts, and the weights of the second iteration drawn from them, must resume too.
    "study-stack-hard-sampling": {"jd.split": "stack_supervisions", "jd.max_supervisions": 2, "custom_sampling": True},
    # Puzzle embeddings only (frozen weights, no Adam state), the study's differential internal stack.
    "study-frozen-internal": {"jd.split": "stack_internal_losses", "freeze_weights": True},
    # Stateful loss-weighting baselines: FAMO's weights and its Adam, updated after every step from the
    # recomputed objectives; DWA's per-epoch loss history (6 batches per epoch: it rolls after step 6).
    "scalarizer-famo": {"jd.split": "iwrm_with_q_halt_in", "jd.scalarizer": "famo"},
    "scalarizer-dwa": {"jd.split": "lm_loss_vs_q_halt_loss", "jd.scalarizer": "dwa"},
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_resuming_from_any_step_reproduces_the_uninterrupted_run(case: str, sudoku_data: Path, tmp_path: Path) -> None:
    steps = 8  # 6 batches per epoch: steps 7-8 run in the second data iteration, after an evaluation
    common = dict(max_steps=steps, eval_interval=1, checkpoint_interval=1, keep_last=100, **RESUME_CASES[case])
    reference = tmp_path / "reference"
    run(compose(tiny_overrides(sudoku_data, tmp_path, run_dir=reference, **common)))
    assert [int(p.stem.split("_")[1]) for p in list_checkpoints(reference)] == list(range(1, steps + 1))
    reference_records = read_records(reference)
    assert any("eval/accuracy" in r and r["step"] < steps for r in reference_records), "no evaluation in the middle"
    # The checkpoint of step 7 is written before step 7's evaluation: resuming from it redoes the evaluation.
    assert load_checkpoint(reference / "checkpoints" / "step_00000007.pt")["progress"]["eval_pending"] == 1

    for k in range(1, steps):
        # The run "died" after step k: later checkpoints never happened, but metrics.jsonl has records
        # past k, a torn last line and a half-written temporary checkpoint from the killed write.
        resumed = tmp_path / f"died_after_{k}"
        (resumed / "checkpoints").mkdir(parents=True)
        shutil.copy(reference / "config.yaml", resumed / "config.yaml")
        for checkpoint in list_checkpoints(reference)[:k]:
            shutil.copy(checkpoint, resumed / "checkpoints" / checkpoint.name)
        torn = (reference / "metrics.jsonl").read_text() + '{"step": 9, "train/lm_lo'
        (resumed / "metrics.jsonl").write_text(torn)
        stray = resumed / "checkpoints" / f".step_{k + 1:08d}.pt.ab12cd34.tmp"
        stray.write_bytes((reference / "checkpoints" / f"step_{k + 1:08d}.pt").read_bytes()[:1000])
        kept = {name: digest for name, digest in file_hashes(resumed).items() if name.startswith("checkpoints/step_") or name == "config.yaml"}

        summary = run(compose(tiny_overrides(sudoku_data, tmp_path, run_dir=resumed, load_checkpoint=resumed, **common)))
        assert summary["status"] == "finished" and summary["final_step"] == steps
        assert_same_training_state(reference, resumed)
        assert read_records(resumed) == reference_records, f"metrics differ after resuming from step {k}"
        assert not stray.exists(), "the temporary file of a killed write must be cleaned"
        assert_files_kept(kept, resumed)


def test_evaluation_does_not_move_the_training_trajectory(sudoku_data: Path, tmp_path: Path) -> None:
    common = dict(max_steps=14, eval_interval=1, ema=True, **{"arch.halt_exploration_prob": 0.5})
    with_evals = run(compose(tiny_overrides(sudoku_data, tmp_path, run_name="evals", **common)))
    without = run(compose(tiny_overrides(sudoku_data, tmp_path, run_name="no-evals", min_eval_interval=1000, **common)))
    records = read_records(Path(with_evals["run_dir"]))
    assert sum("eval/accuracy" in r for r in records) == 3  # after epochs 1 and 2, and at the end
    train = [r for r in records if "train/lm_loss" in r]
    assert train == [r for r in read_records(Path(without["run_dir"])) if "train/lm_loss" in r]
    assert_same_training_state(Path(with_evals["run_dir"]), Path(without["run_dir"]), count_evaluations=False)


# ------------------------------------------------------------------------------ interruption
@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_matches_the_uninterrupted_run(sudoku_data: Path, tmp_path: Path) -> None:
    kill_after = random.Random().randint(2, 12)
    keep_last = 3
    common = dict(max_steps=40, epochs=8, eval_interval=1, checkpoint_interval=1, keep_last=keep_last)
    reference = Path(run(compose(tiny_overrides(sudoku_data, tmp_path, run_name="reference", **common)))["run_dir"])
    args = tiny_overrides(sudoku_data, tmp_path, run_name="killed", **common)
    run_dir = tmp_path / "sudoku4" / "killed"

    kill_after_checkpoint(args, run_dir, kill_after)
    checkpoints = list_checkpoints(run_dir)
    assert checkpoints and len(checkpoints) <= keep_last + 1, f"killed after step {kill_after}: {checkpoints}"
    for checkpoint in checkpoints:  # whatever moment the kill hit, every checkpoint on disk is whole
        load_checkpoint(checkpoint)
    config_before = file_hashes(run_dir)["config.yaml"]

    summary = run(compose(args + [f"load_checkpoint={run_dir}"]))
    assert summary["status"] == "finished" and summary["final_step"] == 40
    assert_same_training_state(reference, run_dir)
    assert read_records(run_dir) == read_records(reference), f"metrics differ (killed after step {kill_after})"
    assert len(list_checkpoints(run_dir)) == keep_last
    assert not list((run_dir / "checkpoints").glob(".*.tmp"))
    assert file_hashes(run_dir)["config.yaml"] == config_before


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_at_a_step_boundary_with_a_checkpoint_and_a_resume_command(
    sig: signal.Signals, sudoku_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A long run (no evaluation, no checkpoint unless stopped) that the signal surely interrupts. The
    # learning rate is constant after warm-up, so a run of any max_steps follows the same trajectory.
    common = dict(epochs=1000, eval_interval=1000)
    args = tiny_overrides(sudoku_data, tmp_path, run_name="stopped", max_steps=5000, **common)
    run_dir = tmp_path / "sudoku4" / "stopped"
    process = start_pretrain(args)
    wait_for(lambda: logged_steps(run_dir) >= 3, process)
    process.send_signal(sig)
    out, err = process.communicate(timeout=120)

    assert process.returncode == 0, err
    stopped_at = json.loads((run_dir / "summary.json").read_text())
    assert stopped_at["status"] == f"interrupted by {sig.name}" and 3 <= stopped_at["final_step"] < 5000
    assert [p.name for p in list_checkpoints(run_dir)] == [f"step_{stopped_at['final_step']:08d}.pt"]
    assert read_records(run_dir)[-1]["step"] == stopped_at["final_step"]  # stopped at a step boundary
    hint = next(line for line in out.splitlines() if line.startswith("Resume with: "))
    before = file_hashes(run_dir)

    # The printed command continues the run (here for 4 more steps) and reaches exactly the uninterrupted result.
    resume_args = shlex.split(hint.removeprefix("Resume with: "))[2:]
    assert resume_args[-1] == f"load_checkpoint={run_dir}" and "max_steps=5000" in resume_args
    end = stopped_at["final_step"] + 4
    status, _, resume_err = cli(resume_args + [f"max_steps={end}"], capsys)
    assert status == 0, resume_err
    reference = Path(run(compose(tiny_overrides(sudoku_data, tmp_path, run_name="reference", max_steps=end, **common)))["run_dir"])
    assert_same_training_state(reference, run_dir)
    assert read_records(run_dir) == read_records(reference)
    assert_files_kept(before, run_dir, allow_changed=("metrics.jsonl", "summary.json"))


def test_a_second_signal_stops_at_once() -> None:
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    with StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert signals.received == "SIGTERM"
        with pytest.raises(SystemExit) as stopped:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        assert stopped.value.code == 128 + signal.SIGTERM
    with StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert signals.received == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in glob.glob(f"/proc/{pid}/task/*/children"):
        found += [int(child) for child in Path(task).read_text().split()]
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the torchrun worker through /proc")
def test_torchrun_restart_resumes_from_the_latest_checkpoint(sudoku_data: Path, tmp_path: Path) -> None:
    kill_after = random.Random().randint(2, 8)
    common = dict(max_steps=36, epochs=6, eval_interval=1, checkpoint_interval=1, keep_last=100)
    reference = Path(run(compose(tiny_overrides(sudoku_data, tmp_path / "ref", run_name="reference", **common)))["run_dir"])
    # No run_name: the generated name must be found again by the restarted worker (torchrun's run id).
    args = tiny_overrides(sudoku_data, tmp_path / "elastic", **common)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--max-restarts", "1", "--monitor-interval", "0.1"]
    process = subprocess.Popen(
        [*torchrun, "pretrain.py", *args], cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    pattern = str(tmp_path / "elastic" / "sudoku4" / "*" / "checkpoints" / f"step_{kill_after:08d}.pt")
    wait_for(lambda: bool(glob.glob(pattern)), process)
    workers = _children(process.pid)
    assert len(workers) == 1
    os.kill(workers[0], signal.SIGKILL)  # a real worker crash, in the middle of training
    run_dir = Path(glob.glob(pattern)[0]).parents[1]
    first_attempt = {name: digest for name, digest in file_hashes(run_dir).items() if name.startswith("checkpoints/step_")}
    out, err = process.communicate(timeout=300)

    assert process.returncode == 0, err[-3000:]
    assert "-job-" in run_dir.name and [p.name for p in run_dir.parent.iterdir()] == [run_dir.name]
    assert f"Resuming from {run_dir / 'checkpoints'}" in out, out[-2000:]
    assert_files_kept(first_attempt, run_dir)  # the restart resumed: it rewrote none of the first attempt's checkpoints
    assert_same_training_state(reference, run_dir)
    assert read_records(run_dir) == read_records(reference)


def test_restart_rules_need_a_directory_that_can_be_found_again(sudoku_data: Path, tmp_path: Path) -> None:
    config = compose(tiny_overrides(sudoku_data, tmp_path))
    with pytest.raises(ConfigError, match="run_name"):
        plan_run(config, ElasticInfo(restart_count=0, max_restarts=2, run_id="none"))  # multi-node torchrun without --rdzv-id
    plan = plan_run(config, ElasticInfo(restart_count=0, max_restarts=2, run_id="4f2a-job"))
    assert plan.run_dir == tmp_path / "sudoku4" / "trm-gd-s0-job-4f2a-job" and plan.checkpoint is None and not plan.continues_run
    # A restart before the first checkpoint starts over in the same directory (which the first attempt created).
    plan.run_dir.mkdir(parents=True)
    (plan.run_dir / "config.yaml").write_text("x")
    restart = plan_run(config, ElasticInfo(restart_count=1, max_restarts=2, run_id="4f2a-job"))
    assert restart.run_dir == plan.run_dir and restart.checkpoint is None and restart.continues_run and "no checkpoint" in (restart.note or "")


# -------------------------------------------------------------------------- non-finite steps
def _training_state(trainer: Trainer) -> dict[str, Any]:
    return {
        "model": {k: v.clone() for k, v in trainer.model.state_dict().items()},
        "optimizer": {k: {n: t.clone() for n, t in s.items()} for k, s in trainer.optimizers.weights.state_dict()["state"].items()},
        "ema": {k: v.clone() for k, v in trainer.ema.state_dict().items()} if trainer.ema is not None else None,
    }


NONFINITE_CASES = {
    # A NaN weight: NaN logits, loss, objectives and gradients.
    "gd-nan-loss": ("none", "core.lm_head.weight", float("nan")),
    "jd-nan-objectives": ("pixelwise_q_halt_in", "core.lm_head.weight", float("nan")),
    # A huge weight behind an RMS norm: the loss stays finite, the gradient (GD) or the Jacobian and
    # Gramian (JD) do not; only the JD step sees the latter.
    "gd-finite-loss-nonfinite-gradient": ("none", "core.L_level.layers.0.self_attn.o_proj.weight", 1e30),
    "jd-finite-loss-nonfinite-gramian": ("pixelwise_q_halt_in", "core.L_level.layers.0.self_attn.o_proj.weight", 1e30),
}


@pytest.mark.parametrize("case", sorted(NONFINITE_CASES))
def test_a_nonfinite_step_is_skipped_without_touching_any_state(case: str, sudoku_data: Path, tmp_path: Path) -> None:
    split, name, poison = NONFINITE_CASES[case]
    extra = {"jd.split": split, "jd.n_groups": 4} if split != "none" else {}
    trainer = Trainer(compose(tiny_overrides(sudoku_data, tmp_path, ema=True, run_name="poisoned", **extra)), CPU)
    for _ in range(2):
        assert trainer.step()["train/skipped_nonfinite"] == 0
    before = _training_state(trainer)
    weight = dict(trainer.model.named_parameters())[name]
    healthy = weight.detach().clone()
    with torch.no_grad():
        weight.fill_(poison)

    metrics = trainer.step()
    assert metrics["train/skipped_nonfinite"] == 1 and trainer.progress.consecutive_nonfinite == 1
    if poison == 1e30:
        assert np.isfinite(metrics["train/lm_loss"]), "this case is about a finite loss with non-finite derivatives"
    if split != "none":
        assert metrics["jd/skipped_nonfinite"] >= 1
    after = _training_state(trainer)
    with torch.no_grad():
        weight.copy_(healthy)
    after["model"][name] = healthy
    assert_identical(before, after)  # no weight, puzzle-embedding row, optimizer moment or EMA moved
    assert all(torch.isfinite(v).all() for v in trainer.ema.state_dict().values())
    assert trainer.model.puzzle_embedding.pending_rows() == []
    assert all(carry is None or torch.isfinite(carry.latent.z_H).all() for carry in trainer.supervision.carries)

    metrics = trainer.step()  # healthy again: the next step trains
    assert metrics["train/skipped_nonfinite"] == 1 and trainer.progress.consecutive_nonfinite == 0
    assert not torch.equal(weight, healthy)
    trainer.logger.close()


def test_a_diverged_run_stops_and_keeps_the_last_good_checkpoint(sudoku_data: Path, tmp_path: Path) -> None:
    common = dict(run_name="diverge", checkpoint_interval=1, keep_last=2, ema=True, max_nonfinite_steps=3)
    run(compose(tiny_overrides(sudoku_data, tmp_path, max_steps=3, **common)))
    run_dir = tmp_path / "sudoku4" / "diverge"
    before = file_hashes(run_dir)
    good = load_checkpoint(list_checkpoints(run_dir)[-1])

    trainer = Trainer(compose(tiny_overrides(sudoku_data, tmp_path, max_steps=20, load_checkpoint=run_dir, **common)), CPU)
    with torch.no_grad():
        trainer.model.core.lm_head.weight.fill_(float("inf"))
    with pytest.raises(NonFiniteError, match=r"3 optimizer steps in a row \(steps 4-6\).*step_00000003.pt"):
        trainer.fit()

    assert_files_kept(before, run_dir, allow_changed=("metrics.jsonl", "summary.json"))
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_00000002.pt", "step_00000003.pt"]
    assert_identical(good, load_checkpoint(list_checkpoints(run_dir)[-1]))
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "stopped: non-finite"
    records = read_records(run_dir)
    assert [r["step"] for r in records if "train/lm_loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["train/skipped_nonfinite"] for r in records if "train/lm_loss" in r] == [0, 0, 0, 1, 2, 3]


def test_the_cli_reports_divergence_in_one_line_with_status_3(sudoku_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = tiny_overrides(
        sudoku_data, tmp_path, run_name="huge-lr", lr=1e30, lr_warmup_steps=0, max_steps=20, max_nonfinite_steps=2, ema=True, checkpoint_interval=1
    )
    status, _, err = cli(args, capsys)
    assert status == 3
    assert_one_line_error(err, "training diverged")
    summary = json.loads((tmp_path / "sudoku4" / "huge-lr" / "summary.json").read_text())
    assert summary["status"] == "stopped: non-finite" and summary["final_step"] < 20
    for checkpoint in list_checkpoints(tmp_path / "sudoku4" / "huge-lr"):
        state = load_checkpoint(checkpoint)
        assert all(torch.isfinite(v).all() for v in (*state["model"].values(), *state["ema"].values()))


# ------------------------------------------------------------------------------- bad input
BAD_CONFIGS = [
    (["lr=abc"], "lr"),
    (["lr=inf"], "finite"),
    (["epochs=0"], "epochs"),
    (["seed=-1"], "seed"),
    (["keep_last=0"], "keep_last"),
    (["grad_accum_steps=3"], "divisible"),
    (["experiment=arc3"], "experiment=arc3"),
    (["arch=nope"], "accepted"),
    (["+learning_rate=1"], "learning_rate"),
    (["lr=["], "lr=["),
    (["jd.split=nonsense"], "jd.split"),
    (["jd.split=pixelwise_q_halt_in", "jd.aggregator=nope"], "nope"),
    (["jd.n_groups=2"], "jd.n_groups"),
    (["arch.hidden_size=31"], "num_heads"),
    (["arch.puzzle_emb_ndim=200", "arch.puzzle_emb_len=1"], "puzzle_emb_ndim"),
    (["evaluators=[{name: arc}]"], "ARC"),
    (["run_name=a/b"], "run_name"),
    (["resume=true"], "which run"),
    (["run_name=a", "run_dir=/tmp/b"], "not both"),
    (["device=cuda"] if not torch.cuda.is_available() else ["device=gpu"], "device"),
]


def test_bad_configs_fail_in_one_line_before_any_training(sudoku_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data_before = file_hashes(sudoku_data)
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    for extra, needle in [*BAD_CONFIGS, ([f"runs_root={a_file}"], "cannot create the run directory")]:
        status, out, err = cli(tiny_overrides(sudoku_data, tmp_path / "runs") + extra, capsys)
        assert status == 2, (extra, out, err)
        assert_one_line_error(err, needle)
    assert not (tmp_path / "runs").exists(), "nothing may be created for a bad config"
    assert_files_kept(data_before, sudoku_data)


def _damaged_copies(source: Path, root: Path) -> list[tuple[Path, str]]:
    """Copies of a dataset, each damaged in one way, with a phrase the error must contain."""
    cases = []

    def copy(name: str) -> Path:
        target = root / name
        shutil.copytree(source, target)
        return target

    truncated = copy("truncated")
    data = (truncated / "train" / "inputs.npy").read_bytes()
    (truncated / "train" / "inputs.npy").write_bytes(data[: len(data) // 2])
    cases.append((truncated, "inputs.npy"))

    for name, change, needle in (
        ("wrong-seq-len", {"seq_len": 17}, "grid_shape [4, 4] holds 16 cells but seq_len is 17"),
        ("small-vocab", {"vocab_size": 3}, "vocabulary"),
        ("few-identifiers", {"num_puzzle_identifiers": 2}, "identifiers"),
        ("seq-len-text", {"seq_len": "sixteen"}, "sixteen"),
        ("newer-format", {"format_version": 99}, "format_version"),
    ):
        folder = copy(name)
        metadata = json.loads((folder / "metadata.json").read_text())
        metadata.update(change)
        (folder / "metadata.json").write_text(json.dumps(metadata))
        cases.append((folder, needle))

    bad_json = copy("bad-json")
    (bad_json / "metadata.json").write_text("{not json")
    cases.append((bad_json, "JSON"))

    missing = copy("missing-array")
    (missing / "train" / "labels.npy").unlink()
    cases.append((missing, "labels.npy"))

    offsets = copy("bad-offsets")
    indices = np.load(offsets / "train" / "puzzle_indices.npy")
    np.save(offsets / "train" / "puzzle_indices.npy", indices[::-1].copy())
    cases.append((offsets, "puzzle_indices"))
    return cases


def test_bad_datasets_fail_in_one_line_and_stay_untouched(sudoku_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for folder, needle in _damaged_copies(sudoku_data, tmp_path / "data"):
        before = file_hashes(folder)
        status, out, err = cli(tiny_overrides(folder, tmp_path / "runs"), capsys)
        assert status == 2, (folder.name, out, err)
        assert_one_line_error(err, needle)
        assert_files_kept(before, folder)
    # Test data that does not match the training data.
    other = tmp_path / "data" / "sudoku9"
    from dataset.build_sudoku_dataset import build_generated_sudoku

    build_generated_sudoku(other, size=9, num_train=8, num_test=4, min_givens=30, max_givens=40, seed=0, progress=False)
    status, _, err = cli(tiny_overrides(sudoku_data, tmp_path / "runs") + [f"data_paths_test=[{other}]"], capsys)
    assert status == 2
    assert_one_line_error(err, "data_paths_test")
    assert not (tmp_path / "runs").exists()


def test_bad_checkpoints_fail_in_one_line_and_change_nothing(sudoku_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = tiny_overrides(sudoku_data, tmp_path, max_steps=3, checkpoint_interval=1, keep_last=10)
    source = Path(run(compose(base + ["run_name=source"]))["run_dir"])
    newest = list_checkpoints(source)[-1]
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(newest.read_bytes()[:-100])
    foreign = tmp_path / "foreign.pt"
    torch.save({"weight": torch.zeros(2)}, foreign)
    pickled = tmp_path / "pickled.pt"
    torch.save({"format": 1, "model": {}, "code": PurePosixPath("x")}, pickled)  # only a full unpickler builds this
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    before = file_hashes(tmp_path)

    cases = [
        (base + [f"load_checkpoint={source}", "arch.hidden_size=64"], "does not fit"),
        (base + [f"load_checkpoint={source}", "arch.name=hrm", "arch.H_layers=1"], "does not fit"),
        (base + [f"load_checkpoint={truncated}"], "unreadable"),
        (base + [f"load_checkpoint={foreign}"], "not a trm-jd checkpoint"),
        (base + [f"load_checkpoint={pickled}"], "unreadable"),
        (base + [f"load_checkpoint={empty}"], "the file is empty (0 bytes)"),
        (base + [f"init_from={empty}", "run_name=fresh"], "the file is empty (0 bytes)"),
        (base + [f"load_checkpoint={tmp_path / 'nothing.pt'}"], "no such checkpoint file"),
        (base + [f"load_checkpoint={list_checkpoints(source)[0]}"], "not the newest checkpoint"),
        (base + ["run_name=source"], "already exists"),
        (base + [f"load_checkpoint={source}", "global_batch_size=96"], "data position"),
    ]
    for args, needle in cases:
        status, out, err = cli(args, capsys)
        assert status == 2, (args[-2:], out, err)
        assert_one_line_error(err, needle)
    assert_files_kept(before, tmp_path)
    assert sorted(p.name for p in (tmp_path / "sudoku4").iterdir()) == ["source"], "no run directory may be created"

    # An older checkpoint can start a new run; its source run is left as it was.
    status, _, err = cli(base + [f"load_checkpoint={list_checkpoints(source)[0]}", "run_name=branch", "max_steps=4"], capsys)
    assert status == 0, err
    assert_files_kept(before, tmp_path)
    assert [p.name for p in list_checkpoints(tmp_path / "sudoku4" / "branch")][-1] == "step_00000004.pt"


def test_a_signal_while_starting_stops_with_a_word_and_a_second_signal_is_named_in_the_status(capfd: pytest.CaptureFixture[str]) -> None:
    from training.interrupt import StartupSignals, stopped_at_once_status

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    for sig in (signal.SIGTERM, signal.SIGINT):
        with pytest.raises(SystemExit) as stopped:
            with StartupSignals():
                os.kill(os.getpid(), sig)
                time.sleep(1)
        assert stopped.value.code == 128 + sig
        assert f"{sig.name} received before training started" in capfd.readouterr().err
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers
    assert stopped_at_once_status(SystemExit(128 + signal.SIGTERM)) == "stopped by a second SIGTERM, without a new checkpoint"
    assert stopped_at_once_status(KeyboardInterrupt()) == "stopped by a second SIGINT, without a new checkpoint"
    assert stopped_at_once_status(ValueError()) is None


def test_a_sigterm_while_importing_is_said_not_silent() -> None:
    """The signal handlers are installed before pretrain.py's heavy imports (torch, Hydra: seconds)."""
    process = subprocess.Popen([sys.executable, "pretrain.py", "max_steps=1"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.4)  # the interpreter is up; torch is still importing
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143 and "SIGTERM received while starting" in err
