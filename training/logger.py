"""Metrics logging: ``metrics.jsonl`` in the run directory and the same keys in W&B (offline by default)."""

from __future__ import annotations

import json
import math
import os
import uuid
from pathlib import Path
from typing import Any

from dataset.atomic import atomic_write_text
from training.config import ConfigError, WandbConfig
from training.wandb_credentials import find_wandb_credentials


class MetricsWriteError(OSError):
    """``metrics.jsonl`` could not be written (a full disk, a file system turned read-only)."""


class RunLogger:
    """Writes one JSON object per logged step to ``RUN_DIR/metrics.jsonl`` and mirrors it to W&B.

    W&B runs offline unless ``wandb.mode=online``; ``disabled`` turns it off. It never asks for a
    login: online mode without credentials is an error raised before training starts.
    """

    def __init__(
        self,
        run_dir: Path,
        config: dict[str, Any],
        wandb_config: WandbConfig,
        run_name: str,
        project_name: str,
        resume_step: int | None = None,
        redo_eval: bool = False,
    ) -> None:
        """``resume_step``: the run continues after this step; later records are dropped (and, with
        ``redo_eval``, the evaluation records of that step, since the evaluation runs again)."""
        self.path = run_dir / "metrics.jsonl"
        if resume_step is not None:
            _truncate_after(self.path, resume_step, drop_eval_at_step=redo_eval)
        self._file = open(self.path, "a", buffering=1)
        self._wandb = _start_wandb(run_dir, config, wandb_config, run_name, project_name, resumed=resume_step is not None)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Append one record (line-buffered: on disk when this returns). Raises :class:`MetricsWriteError`
        naming the file and the cause when it cannot be written."""
        record = {"step": step, **{key: _plain(value) for key, value in metrics.items()}}
        try:
            self._file.write(json.dumps(record) + "\n")
        except OSError as error:
            from dataset.atomic import write_failure

            raise MetricsWriteError(error.errno, f"cannot write {self.path}: {write_failure(self.path.parent, error)}") from None
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def log_evaluation(self, step: int, results: dict[str, float], *, show: bool) -> None:
        """Log an evaluation's metrics; ``show`` also prints its accuracies."""
        self.log(step, results)
        if show:
            shown = {k: round(v, 4) for k, v in results.items() if "accuracy" in k or "pass@" in k}
            print(f"[eval step {step}] {shown}", flush=True)

    def close(self) -> None:
        try:
            self._file.close()
        except OSError:  # the failed write was reported; closing flushes nothing more
            pass
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def check_wandb_config(wandb_config: WandbConfig) -> None:
    """Fail fast (before compute) when online mode is asked for without credentials."""
    if wandb_config.mode != "online":
        return

    if find_wandb_credentials() is None:
        raise ConfigError("wandb.mode=online needs a W&B login (wandb login or WANDB_API_KEY); use wandb.mode=offline to log locally")


def method_label(jd: dict[str, Any]) -> str:
    """``gd``, ``aggregator:NAME`` or ``scalarizer:NAME`` from a run's ``jd`` config section (a dict)."""
    if jd.get("split", "none") == "none":
        return "gd"
    if jd.get("scalarizer"):
        return f"scalarizer:{jd['scalarizer']}"
    return f"aggregator:{jd.get('aggregator') or 'upgrad'}"


def _start_wandb(run_dir: Path, config: dict[str, Any], wandb_config: WandbConfig, run_name: str, project_name: str, resumed: bool) -> Any:
    if wandb_config.mode == "disabled":
        return None
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    tags = list(wandb_config.tags)
    jd = config.get("jd", {})
    tags += [f"split:{jd.get('split', 'none')}", method_label(jd)]
    run_id_file = run_dir / "wandb_run_id.txt"
    run_id = run_id_file.read_text().strip() if resumed and run_id_file.exists() else uuid.uuid4().hex[:8]
    atomic_write_text(run_id_file, run_id)
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


def _truncate_after(path: Path, step: int, drop_eval_at_step: bool = False) -> None:
    """Keep only the records up to ``step`` so a resumed run's log matches an uninterrupted one.

    With ``drop_eval_at_step``, the evaluation records of ``step`` (those without ``train/`` keys)
    go too. A torn last line (the process was killed while writing it) is dropped. The file is
    replaced atomically, so a crash here leaves the old log.
    """
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        record_step = record.get("step") if isinstance(record, dict) else None
        if not isinstance(record_step, (int, float)) or record_step > step:
            continue
        is_eval = not any(key.startswith("train/") for key in record)
        if drop_eval_at_step and is_eval and record_step == step:
            continue
        kept.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
