"""Metrics logging: ``metrics.jsonl`` in the run directory and the same keys in W&B (offline by default)."""

from __future__ import annotations

import json
import math
import os
import uuid
from pathlib import Path
from typing import Any

from training.config import WandbConfig


class RunLogger:
    """Writes one JSON object per logged step to ``RUN_DIR/metrics.jsonl`` and mirrors it to W&B.

    W&B runs offline unless ``wandb.mode=online``; ``disabled`` turns it off. It never asks for a
    login: online mode without credentials is an error raised before training starts.
    """

    def __init__(self, run_dir: Path, config: dict[str, Any], wandb_config: WandbConfig, run_name: str, project_name: str, resume_step: int | None = None) -> None:
        self.path = run_dir / "metrics.jsonl"
        if resume_step is not None:
            _truncate_after(self.path, resume_step)
        self._file = open(self.path, "a", buffering=1)
        self._wandb = _start_wandb(run_dir, config, wandb_config, run_name, project_name, resumed=resume_step is not None)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        record = {"step": step, **{key: _plain(value) for key, value in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def close(self) -> None:
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def check_wandb_config(wandb_config: WandbConfig) -> None:
    """Fail fast (before compute) when online mode is asked for without credentials."""
    if wandb_config.mode != "online":
        return
    import wandb

    if not (os.environ.get("WANDB_API_KEY") or wandb.api.api_key):
        raise RuntimeError("wandb.mode=online needs a W&B login (wandb login or WANDB_API_KEY); use wandb.mode=offline to log locally")


def _start_wandb(run_dir: Path, config: dict[str, Any], wandb_config: WandbConfig, run_name: str, project_name: str, resumed: bool) -> Any:
    if wandb_config.mode == "disabled":
        return None
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    tags = list(wandb_config.tags)
    jd = config.get("jd", {})
    tags += [f"split:{jd.get('split', 'none')}", f"aggregator:{jd.get('aggregator', '-') if jd.get('split') != 'none' else 'gd'}"]
    run_id_file = run_dir / "wandb_run_id.txt"
    run_id = run_id_file.read_text().strip() if resumed and run_id_file.exists() else uuid.uuid4().hex[:8]
    run_id_file.write_text(run_id)
    return wandb.init(
        project=wandb_config.project or project_name,
        entity=wandb_config.entity,
        group=wandb_config.group or project_name,
        name=run_name,
        id=run_id,
        resume="allow",
        dir=str(run_dir),
        config=config,
        tags=tags,
        mode=wandb_config.mode,
        settings=wandb.Settings(console="off", silent=True, x_disable_stats=True),
    )


def _truncate_after(path: Path, step: int) -> None:
    """Keep only the records up to ``step`` so a resumed run's log matches an uninterrupted one."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    temp = path.with_suffix(".jsonl.tmp")
    temp.write_text("".join(line + "\n" for line in kept))
    os.replace(temp, path)


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
