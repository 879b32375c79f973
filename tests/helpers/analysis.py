"""Shared by the analysis tests (tests/*/test_analysis.py)."""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from omegaconf import OmegaConf


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
