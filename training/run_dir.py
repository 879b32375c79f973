"""Choosing the run directory and the checkpoint to start from, without ever reusing a run by accident.

:func:`plan_run` decides, from the config and ``torchrun``'s restart information, *where* a run writes
and *what* it restores; it has no side effects, so a bad choice fails before anything is created.
:func:`prepare_run_dir` then creates the directory. The rules:

* A new run (no ``load_checkpoint``, no ``resume``) writes to ``run_dir``, or
  ``runs_root/PROJECT/run_name``, which must not exist yet (or be empty); without either, a name is
  generated (``ARCH-METHOD-sSEED-TIMESTAMP``, with a numeric suffix if taken).
* ``load_checkpoint=RUN_DIR`` or the newest ``RUN_DIR/checkpoints/step_N.pt``: the run continues in
  ``RUN_DIR``. An *older* checkpoint of a run cannot be continued in place (that would discard the
  later checkpoints and metrics): start a new run from it with ``run_name=NEW`` (or ``run_dir=``).
  A checkpoint with another ``run_name``/``run_dir``, or a file outside a run directory, starts a new
  run that restores the full training state.
* ``resume=true``, or a restart by ``torchrun --max-restarts`` (``TORCHELASTIC_RESTART_COUNT > 0``):
  the run's own directory (``run_dir``, ``run_name``, or the checkpoint's run) continues from its newest
  checkpoint, which wins over ``load_checkpoint``; with no checkpoint there yet, the run starts over
  in that directory (from ``load_checkpoint`` when given).
* Under ``torchrun --max-restarts N`` (N > 0) the directory must be found again by the restarted
  workers: give ``run_name``/``run_dir``, or the generated name ends with torchrun's run id
  (``...-job-RUNID``, the same for every attempt of one job) instead of a timestamp.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from dataset.atomic import atomic_write_text, remove_stale_temp_files, write_failure
from training.checkpoint import CheckpointError, latest_checkpoint, resolve_checkpoint, run_dir_of
from training.config import ConfigError, TrainConfig
from training.distributed import DistInfo, ElasticInfo, decide_on_main
from training.run_lock import LOCK_FILE, RunInUseError, RunLock
from training.state import Progress


class RunDirError(ValueError):
    """The run directory exists and this run is not resuming it."""


@dataclass(frozen=True)
class RunPlan:
    """Where a run writes and what it restores (see the module docstring)."""

    run_dir: Path | None  # None: a new run with a generated name, chosen when it is created
    checkpoint: Path | None  # the checkpoint to restore; None: fresh weights
    continues_run: bool  # run_dir already belongs to this run: reuse it (resume, restart)
    note: str | None = None  # something the user should know (printed by rank 0)


def default_project_name(config: TrainConfig) -> str:
    return config.project_name or Path(config.data_paths[0]).name


def _method_name(config: TrainConfig) -> str:
    jd = config.jd
    method = "gd" if jd.split == "none" else f"{jd.split}-scalarizer_{jd.scalarizer}" if jd.scalarizer else f"{jd.split}-{jd.aggregator_name}"
    return f"{config.arch.name}-{method}-s{config.seed}"


def default_run_name(config: TrainConfig) -> str:
    """``run_name``, or a generated ``ARCH-METHOD-sSEED-TIMESTAMP``."""
    if config.run_name:
        return config.run_name
    return f"{_method_name(config)}-{time.strftime('%Y%m%d-%H%M%S')}"


def planned_run_dir(config: TrainConfig, elastic: ElasticInfo | None = None) -> Path | None:
    """The run directory named by the config (and torchrun's run id), or ``None`` when it is generated.

    Raises :class:`ConfigError` under ``torchrun --max-restarts`` when no name could be found again.
    """
    if config.run_dir:
        return Path(config.run_dir)
    if config.run_name:
        return Path(config.runs_root) / default_project_name(config) / config.run_name
    if elastic is not None and elastic.may_restart and not config.load_checkpoint:
        if elastic.stable_id is None:
            raise ConfigError(
                f"torchrun --max-restarts {elastic.max_restarts} needs a run directory that restarted workers can find "
                "again: set run_name=NAME (or run_dir=PATH), or give torchrun --rdzv-id=JOB_ID"
            )
        return Path(config.runs_root) / default_project_name(config) / f"{_method_name(config)}-job-{elastic.stable_id}"
    return None


def _same_path(a: Path | None, b: Path | None) -> bool:
    return a is not None and b is not None and a.resolve() == b.resolve()


def abandoned_at_start(run_dir: Path) -> bool:
    """Whether ``run_dir`` was claimed by a run that stopped while starting, before its first step: it holds
    only the claim, the lock, ``config.yaml``, an empty ``metrics.jsonl`` or ``checkpoints/``, W&B's files,
    and no live process holds it. The same command may then take it over."""
    if not run_dir.is_dir() or not (run_dir / CLAIM_FILE).is_file() or RunLock.is_held(run_dir):
        return False
    for entry in run_dir.iterdir():
        empty_file = entry.is_file() and entry.stat().st_size == 0
        if entry.name in (CLAIM_FILE, LOCK_FILE, "config.yaml", "wandb") or (entry.name == "metrics.jsonl" and empty_file):
            continue
        if entry.name == "checkpoints" and entry.is_dir() and not any(entry.iterdir()):
            continue
        return False
    return True


def _refuse_existing(run_dir: Path | None) -> None:
    if run_dir is not None and run_dir.exists() and abandoned_at_start(run_dir):
        return
    if run_dir is not None and run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise RunDirError(
            f"run directory {run_dir} already exists; pick another run_name, or continue it with load_checkpoint={run_dir} (or resume=true)"
        )


def plan_run(config: TrainConfig, elastic: ElasticInfo) -> RunPlan:
    """Decide the run directory and the checkpoint to restore (no side effects; see the module docstring)."""
    if config.run_dir and config.run_name:
        raise ConfigError(f"give run_dir={config.run_dir} or run_name={config.run_name}, not both")
    own_dir = planned_run_dir(config, elastic)
    try:
        source = resolve_checkpoint(config.load_checkpoint) if config.load_checkpoint else None
    except CheckpointError as error:
        raise CheckpointError(f"load_checkpoint: {error}") from None
    source_run = run_dir_of(source) if source is not None else None
    target = own_dir if own_dir is not None else source_run

    if config.resume or elastic.is_restart:
        reason = "resume=true" if config.resume else f"torchrun restart {elastic.restart_count}"
        if target is None:
            raise ConfigError(f"{reason}: which run? set run_name=NAME or run_dir=PATH (or load_checkpoint=RUN_DIR)")
        latest = latest_checkpoint(target)
        if latest is not None:
            return RunPlan(target, latest, continues_run=True)
        if source is not None:
            return RunPlan(target, source, continues_run=True, note=f"{reason}: {target} has no checkpoint yet; starting from {source}")
        return RunPlan(target, None, continues_run=True, note=f"{reason}: {target} has no checkpoint yet; starting the run from scratch")

    if source is not None:
        if source_run is not None and _same_path(target, source_run):
            latest = latest_checkpoint(source_run)
            if latest is not None and not _same_path(latest, source):
                raise CheckpointError(
                    f"load_checkpoint={source} is not the newest checkpoint of its run ({latest.name} is); continuing "
                    f"the run from it would discard the later checkpoints and metrics. Continue from the newest with "
                    f"load_checkpoint={source_run}, or start a new run from this one with run_name=NEW_NAME"
                )
            return RunPlan(target, source, continues_run=True)
        _refuse_existing(target)
        return RunPlan(target, source, continues_run=False)

    _refuse_existing(own_dir)
    return RunPlan(own_dir, None, continues_run=False)


def claim_run(config: TrainConfig, dist_info: DistInfo, elastic: ElasticInfo) -> tuple[RunPlan, RunLock | None]:
    """Decide where the run writes and what it restores (rank 0 for all, no side effects), and lock a run
    directory that is continued (rank 0 holds it until the run ends); a new one is locked when created."""
    plan = decide_on_main(dist_info, lambda: plan_run(config, elastic))
    lock = None
    if dist_info.is_main and plan.continues_run and plan.run_dir is not None and plan.run_dir.is_dir():
        lock = lock_run_dir(plan.run_dir)
        if lock.previous:
            print(f"note: taking the run directory over from the process that last trained in it ({lock.previous}; no longer running)", flush=True)
    return plan, lock


def lock_run_dir(run_dir: Path) -> RunLock:
    """Hold ``run_dir`` for this process (:mod:`training.run_lock`); a live holder is a :class:`RunDirError`."""
    try:
        return RunLock.acquire(run_dir)
    except RunInUseError as error:
        raise RunDirError(str(error)) from None
    except OSError as error:
        raise RunDirError(f"cannot lock the run directory {run_dir} ({error.strerror}); check its permissions") from None


CLAIM_FILE = ".claimed"
"""Created exclusively (``O_EXCL``) by the one new run that owns a directory: of two runs started with
the same name at the same moment, exactly one gets it and the other stops."""


def _claim(run_dir: Path) -> None:
    try:
        os.close(os.open(run_dir / CLAIM_FILE, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        raise RunDirError(f"run directory {run_dir} was just claimed by another run starting with the same name; pick another run_name") from None


def prepare_run_dir(
    config: TrainConfig, dist_info: DistInfo, plan: RunPlan, numerics: dict[str, Any] | None = None
) -> tuple[Path, str, str, RunLock | None]:
    """Create the run directory on rank 0 and share it; return ``(run_dir, run_name, project_name, lock)``.

    A new run's directory is claimed and locked (:mod:`training.run_lock`) at once on rank 0, so that no
    other process can take it for one left while starting; ``lock`` is that lock (``None`` on other ranks
    and for a continued run, whose lock the caller took before restoring).

    Writes ``config.yaml`` with ``numerics`` (what else changes the numbers: :mod:`training.numerics`)
    (atomically; a resumed run whose config or numerics differ keeps the original and writes
    ``config.resume-TIMESTAMP.yaml`` beside it) and removes temporary files of killed writes.
    """

    locks: list[RunLock] = []

    def create() -> str:
        run_dir = plan.run_dir
        if run_dir is None:
            base = Path(config.runs_root) / default_project_name(config) / default_run_name(config)
            run_dir, suffix = base, 1
            while run_dir.exists():
                suffix += 1
                run_dir = base.with_name(f"{base.name}-{suffix}")
        elif not plan.continues_run:
            _refuse_existing(run_dir)
            if abandoned_at_start(run_dir):  # stopped while starting: the same command takes it over
                (run_dir / CLAIM_FILE).unlink(missing_ok=True)
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            if not plan.continues_run:
                _claim(run_dir)
                locks.append(lock_run_dir(run_dir))
        except OSError as error:
            raise RunDirError(f"cannot create the run directory {run_dir} ({error.strerror}); check runs_root / run_dir") from None
        for folder in (run_dir, run_dir / "checkpoints"):
            if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
                raise RunDirError(
                    f"the run directory {folder} is not writable; this run must write its checkpoints "
                    "and metrics there (fix its permissions, or start a new run from it with run_name=NEW)"
                )
            remove_stale_temp_files(folder)
        config_file = run_dir / "config.yaml"
        recorded = config.model_dump(mode="json") | ({"numerics": numerics} if numerics else {})
        resolved = OmegaConf.to_yaml(OmegaConf.create(recorded))
        if not config_file.exists():
            atomic_write_text(config_file, resolved)
        elif config_file.read_text() != resolved:
            atomic_write_text(run_dir / f"config.resume-{time.strftime('%Y%m%d-%H%M%S')}.yaml", resolved)
        return str(run_dir)

    run_dir = Path(decide_on_main(dist_info, create))
    return run_dir, run_dir.name, default_project_name(config), (locks[0] if locks else None)


def run_summary(
    status: str,
    progress: Progress,
    run_dir: Path,
    last_eval: dict[str, float],
    checkpoint: Path | None,
    numerics: dict[str, Any],
    best: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What ``summary.json`` records of a run that ended (and ``Trainer.fit`` returns)."""
    return {
        "status": status,
        "final_step": progress.step,
        "run_dir": str(run_dir),
        "eval": last_eval,
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "best": best or {},
        "skipped_nonfinite": progress.skipped_nonfinite,
        "numerics": numerics,
    }


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    """Write ``summary.json``; a failure is one note (the disk that failed the run fails this too: the first error stays)."""
    try:
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    except OSError as error:
        print(f"note: summary.json not written ({write_failure(run_dir, error)})", flush=True)


def logged_evaluation(run_dir: Path) -> dict[str, float]:
    """The final evaluation ``summary.json`` records (empty when there is none or it is unreadable)."""
    try:
        previous = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return dict(previous.get("eval") or {}) if isinstance(previous, dict) else {}
