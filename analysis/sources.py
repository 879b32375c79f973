"""Loading runs from everywhere they live: local run directories, folders, globs and W&B sources."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from analysis.runs import WANDB_PREFIX, Run, RunLoadError, load_run_dir, run_dirs_for
from analysis.wandb_source import load_wandb_runs  # imports the wandb package only when a W&B source is read


def load_runs(paths_or_globs: Sequence[str | os.PathLike[str]], progress: bool = True) -> list[Run]:
    """Load every run the arguments name, in argument order, each run once.

    Each item is a run directory, a folder searched for run directories, a glob pattern (``**``
    allowed), or a W&B source ``wandb:ENTITY/PROJECT``, ``wandb:ENTITY/PROJECT/RUN_ID`` or
    ``wandb:ENTITY/PROJECT@GROUP``. Raises ``RunLoadError`` naming the first item that holds no run.
    """
    if not paths_or_globs:
        raise RunLoadError("no runs given; pass run directories, folders holding runs, or glob patterns")
    local_dirs: list[Path] = []
    wandb_sources: list[str] = []
    for item in map(str, paths_or_globs):
        if item.startswith(WANDB_PREFIX):
            wandb_sources.append(item)
        else:
            local_dirs.extend(run_dirs_for(item))
    unique_dirs = list(dict.fromkeys(d.resolve() for d in local_dirs))
    runs = []
    with tqdm(unique_dirs, desc="reading runs", unit="run", disable=not progress or not unique_dirs, file=sys.stderr) as bar:
        for run_dir in bar:
            try:
                runs.append(load_run_dir(run_dir))
            except RunLoadError:
                bar.leave = False  # the bar's fragment goes, so the error line that follows stands alone
                raise
    if wandb_sources:
        for source in wandb_sources:
            runs.extend(load_wandb_runs(source, progress=progress))
    return runs
