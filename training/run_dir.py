"""Choosing and creating a run directory without ever reusing one by accident."""

from __future__ import annotations

import time
from pathlib import Path

import torch.distributed as dist
from omegaconf import OmegaConf

from training.config import TrainConfig
from training.distributed import DistInfo


class RunDirError(ValueError):
    """The run directory exists and this run is not resuming it."""


def default_project_name(config: TrainConfig) -> str:
    return config.project_name or Path(config.data_paths[0]).name


def default_run_name(config: TrainConfig) -> str:
    if config.run_name:
        return config.run_name
    method = "gd" if config.jd.split == "none" else f"{config.jd.split}-{config.jd.aggregator}"
    return f"{config.arch.name}-{method}-s{config.seed}-{time.strftime('%Y%m%d-%H%M%S')}"


def planned_run_dir(config: TrainConfig, _data: object = None) -> Path | None:
    """The run directory named by the config alone (None when the name would be generated)."""
    if config.run_dir:
        return Path(config.run_dir)
    if config.run_name:
        return Path(config.runs_root) / default_project_name(config) / config.run_name
    return None


def prepare_run_dir(config: TrainConfig, dist_info: DistInfo, resuming_from: Path | None) -> tuple[Path, str, str]:
    """Create (rank 0) and share the run directory; return ``(run_dir, run_name, project_name)``.

    A resumed run continues in the directory its checkpoint belongs to. A new run refuses an existing,
    non-empty directory; a generated name gets a numeric suffix instead.
    """
    project = default_project_name(config)
    chosen: list[object] = [None]
    if dist_info.is_main:
        if resuming_from is not None:
            run_dir = resuming_from.parent.parent
        else:
            run_dir = planned_run_dir(config)
            if run_dir is not None and run_dir.exists() and any(run_dir.iterdir()):
                raise RunDirError(
                    f"run directory {run_dir} already exists; pick another run_name, or resume it with "
                    f"load_checkpoint={run_dir} (or resume=true)"
                )
            if run_dir is None:
                base = Path(config.runs_root) / project / default_run_name(config)
                run_dir, suffix = base, 1
                while run_dir.exists():
                    suffix += 1
                    run_dir = base.with_name(f"{base.name}-{suffix}")
        run_dir.mkdir(parents=True, exist_ok=True)
        config_file = run_dir / "config.yaml"
        resolved = OmegaConf.to_yaml(OmegaConf.create(config.model_dump(mode="json")))
        if not config_file.exists():
            config_file.write_text(resolved)
        elif config_file.read_text() != resolved:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            (run_dir / f"config.resume-{stamp}.yaml").write_text(resolved)
        chosen[0] = str(run_dir)
    if dist_info.world_size > 1:
        dist.broadcast_object_list(chosen, src=0)
    run_dir = Path(str(chosen[0]))
    return run_dir, run_dir.name, run_dir.parent.name if resuming_from is not None else project
