"""Fault injection on CPU: killed and interrupted runs, restarts, non-finite steps and bad input.

The integration tests; the others are in
tests/unit/test_reliability.py,
tests/distributed/test_reliability.py.
"""

from __future__ import annotations

import json
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

from pretrain import run
from tests.conftest import REPO, compose, tiny_overrides
from tests.helpers.reliability import (
    assert_files_kept,
    assert_identical,
    assert_one_line_error,
    assert_same_training_state,
    cli,
    file_hashes,
    kill_after_checkpoint,
    read_records,
    start_pretrain,
    wait_for,
)
from training.checkpoint import list_checkpoints, load_checkpoint
from training.distributed import DistInfo
from training.trainer import NonFiniteError, Trainer

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


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


def test_a_sigterm_while_importing_is_said_not_silent() -> None:
    """The signal handlers are installed before pretrain.py's heavy imports (torch, Hydra: seconds)."""
    process = subprocess.Popen([sys.executable, "pretrain.py", "max_steps=1"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.4)  # the interpreter is up; torch is still importing
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143 and "SIGTERM received while starting" in err
