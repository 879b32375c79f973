"""CUDA-only code paths: bfloat16 training under torch.compile, the fused Adam-atan2, reading batches
ahead through pinned memory and a side stream, and JD with the Mean aggregator equal to GD on the GPU.

Skipped without CUDA (``tests/conftest.py``); ``python -m analysis.device_check`` runs them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pretrain import run
from tests.conftest import compose, tiny_overrides

pytestmark = pytest.mark.gpu


def _train_losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["train/lm_loss"] for r in records if "train/lm_loss" in r]


def test_compiled_bfloat16_training_on_cuda_learns(sudoku_data: Path, tmp_path: Path) -> None:
    summary = run(
        compose(tiny_overrides(sudoku_data, tmp_path, run_name="cuda", device="cuda", compile=True, max_steps=60, epochs=20, eval_interval=10))
    )
    losses = _train_losses(Path(summary["run_dir"]))
    assert summary["status"] == "finished" and all(map(torch.isfinite, torch.tensor(losses)))
    assert sum(losses[-10:]) < sum(losses[:10])


def test_reading_ahead_on_cuda_gives_the_same_run(sudoku_data: Path, tmp_path: Path) -> None:
    common = dict(device="cuda", compile=False, max_steps=12, **{"arch.forward_dtype": "float32"})
    plain = run(compose(tiny_overrides(sudoku_data, tmp_path, run_name="plain", prefetch_batches=0, **common)))
    ahead = run(compose(tiny_overrides(sudoku_data, tmp_path, run_name="ahead", prefetch_batches=2, **common)))
    a, b = _train_losses(Path(plain["run_dir"])), _train_losses(Path(ahead["run_dir"]))
    assert len(a) == len(b) == 12
    assert torch.allclose(torch.tensor(a), torch.tensor(b), rtol=1e-4, atol=1e-5)  # same batches; CUDA kernels may differ in the last bits


def test_jd_with_the_mean_aggregator_is_gd_on_cuda(sudoku_data: Path, tmp_path: Path) -> None:
    common = dict(device="cuda", compile=False, max_steps=6, **{"arch.forward_dtype": "float32"})
    gd = run(compose(tiny_overrides(sudoku_data, tmp_path, run_name="gd", **common)))
    mean = run(
        compose(
            tiny_overrides(
                sudoku_data,
                tmp_path,
                run_name="mean",
                **common,
                **{"jd.split": "lm_loss_vs_q_halt_loss", "jd.aggregator": "mean", "jd.aggregator_kwargs": "null"},
            )
        )
    )
    # The Mean aggregator's update is GD's (tests/test_jd_step.py on CPU): the same trajectory, up to
    # the rounding of the different reduction order on the GPU.
    a, b = _train_losses(Path(gd["run_dir"])), _train_losses(Path(mean["run_dir"]))
    assert len(a) == len(b) == 6
    assert torch.allclose(torch.tensor(a), torch.tensor(b), rtol=1e-3, atol=1e-4)


def test_fused_adam_atan2_matches_the_pure_one() -> None:
    fused = pytest.importorskip("adam_atan2", reason="the fused Adam-atan2 is not installed (pip install -e '.[cuda]')")
    from models.optimizers import AdamATan2

    generator = torch.Generator().manual_seed(0)
    start = torch.randn(256, 64, generator=generator).cuda()
    grads = [torch.randn(256, 64, generator=generator).cuda() for _ in range(10)]
    finals = []
    for cls in (AdamATan2, fused.AdamATan2):
        p = torch.nn.Parameter(start.clone())
        optimizer = cls([p], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
        for g in grads:
            p.grad = g
            optimizer.step()
        finals.append(p.detach())
    assert torch.allclose(finals[0], finals[1], rtol=1e-5, atol=1e-6)
