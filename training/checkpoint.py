"""Checkpoints of the full training state, written atomically and loaded with ``weights_only=True``.

A checkpoint is ``RUN_DIR/checkpoints/step_XXXXXXXX.pt``: a dict of tensors, numbers, strings, lists
and dicts only, so ``torch.load(..., weights_only=True)`` can read it without running pickled code.
Writes go to a temporary file that is fsynced and renamed (:mod:`dataset.atomic`), so a crash at any
moment leaves the previous checkpoints intact; a temporary file left by a killed write is ignored
(it never matches ``step_*.pt``) and removed by the next save. ``keep_last`` bounds how many are kept.
"""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dataset.atomic import atomic_open, remove_stale_temp_files, write_failure
from training.errors import CheckpointError as CheckpointError  # raised here; imported from here by most callers
from training.hub import fetch, is_hub_path
from training.reference_checkpoint import is_reference_state, reference_steps
from training.safetensors_checkpoint import WEIGHTS_FILE, read_safetensors

CHECKPOINT_FORMAT = 1
_NAME = re.compile(r"^step_(\d{8,})\.pt$")


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}.pt"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints of a run, oldest first (temporary files of unfinished writes are not listed)."""
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    numbered = [(int(match.group(1)), p) for p in folder.iterdir() if (match := _NAME.match(p.name))]
    return [p for _, p in sorted(numbered)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint of a run directory, or ``None``."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def run_dir_of(checkpoint: Path) -> Path | None:
    """The run directory a checkpoint file belongs to (``RUN/checkpoints/step_N.pt``), else ``None``."""
    if checkpoint.parent.name == "checkpoints" and _NAME.match(checkpoint.name):
        return checkpoint.parent.parent
    return None


def save_checkpoint(state: dict[str, Any], run_dir: Path, step: int, keep_last: int) -> Path:
    """Write ``state`` atomically as the checkpoint of ``step``; delete all but the ``keep_last`` newest.

    Older checkpoints are deleted only once the new one is complete on disk.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    path = write_checkpoint(state, checkpoint_path(run_dir, step), step)
    remove_stale_temp_files(path.parent)  # left by a write that was killed earlier
    for old in list_checkpoints(run_dir)[:-keep_last]:
        old.unlink(missing_ok=True)
    return path


def write_checkpoint(state: dict[str, Any], path: Path, step: int) -> Path:
    """Write ``state`` atomically to ``path`` as the checkpoint of ``step`` (the previous file, if any, stays
    whole until the new one is complete)."""
    try:
        with atomic_open(path, "wb") as file:
            torch.save({"format": CHECKPOINT_FORMAT, "step": step, **state}, file)
    except (OSError, RuntimeError) as error:  # torch reports a full disk as a RuntimeError of its zip writer
        raise CheckpointError(
            f"cannot write the checkpoint {path}: {write_failure(path.parent, error)}; the earlier checkpoints are intact"
        ) from None
    return path


def resolve_checkpoint(path_or_run: str | Path) -> Path:
    """A checkpoint file, the newest checkpoint of a run directory, the newest ``step_N`` of a reference TRM
    ``checkpoint_path`` folder, or a folder's ``model.safetensors``; ``hf://...`` is fetched first (:mod:`training.hub`)."""
    path = fetch(path_or_run) if is_hub_path(path_or_run) else Path(path_or_run)
    if path.is_dir():
        exported = [path / WEIGHTS_FILE] if (path / WEIGHTS_FILE).is_file() else []
        found = list_checkpoints(path) or list_checkpoints(path.parent) or reference_steps(path) or exported
        if not found:
            raise CheckpointError(f"no checkpoint (checkpoints/step_*.pt, or a reference step_N) under {path}")
        return found[-1]
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file or run directory")
    return path


BEST_NAME, BEST_RAW_NAME = "best.pt", "best_raw.pt"
"""The best checkpoints of a run (:mod:`training.best_checkpoint`), beside ``step_*.pt``: by the evaluated
weights (the EMA weights when the run keeps them), and by the live weights of a run with EMA."""


def resolve_weights(path_or_run: str | Path, *, newest: bool = False) -> Path:
    """Like :func:`resolve_checkpoint`, but a run directory gives its best checkpoint when it keeps one
    (``newest``: its newest step, as before): the weights to evaluate or start from."""
    path = fetch(path_or_run) if is_hub_path(path_or_run) else Path(path_or_run)
    if path.is_dir() and not newest:
        for folder in (path / "checkpoints", path):
            if (folder / BEST_NAME).is_file():
                return folder / BEST_NAME
    return resolve_checkpoint(path)


def read_state(path: Path, map_location: torch.device | str = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with one clear :class:`CheckpointError` for every way it fails
    (empty or truncated file, foreign pickled objects, not a torch file). Objects other than tensors and
    plain containers are never unpickled."""
    if path.suffix == ".safetensors":
        return {"format": CHECKPOINT_FORMAT, **read_safetensors(path)}
    try:
        if path.stat().st_size == 0:
            raise CheckpointError(f"{path}: the file is empty (0 bytes), an interrupted copy or write? Use an earlier checkpoint")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's legacy-format warnings would precede the one error line
            return torch.load(path, map_location=map_location, weights_only=True)
    except CheckpointError:
        raise
    except pickle.UnpicklingError as error:
        if "unsupported global" not in str(error).lower():  # not a pickle at all (random bytes, another format)
            raise CheckpointError(f"{path}: unreadable checkpoint (not a file written by torch.save)") from None
        raise CheckpointError(
            f"{path}: unreadable checkpoint: it holds pickled objects other than tensors and plain containers; they are never loaded, "
            "since unpickling them could run arbitrary code (only checkpoints of tensors, numbers, strings, lists and dicts load)"
        ) from None
    except (EOFError, RuntimeError, OSError, ValueError) as error:
        reason = str(error).splitlines()[0][:200] if str(error).strip() else "the file ends early"
        raise CheckpointError(f"{path}: unreadable or truncated checkpoint ({type(error).__name__}: {reason})") from None
    except Exception as error:  # noqa: BLE001 - torch raises many types for corrupt files
        reason = str(error).splitlines()[0][:200] if str(error).strip() else "no details"
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(error).__name__}: {reason})") from None


def load_checkpoint(path: Path, map_location: torch.device | str = "cpu") -> dict[str, Any]:
    """Load a checkpoint of this toolkit safely (``weights_only=True``) with a clear error if it is not one."""
    return checked_state(read_state(path, map_location), path)


def checked_state(state: Any, path: Path) -> dict[str, Any]:
    """``state`` (as :func:`read_state` returned it) if it is a checkpoint of this toolkit, else a :class:`CheckpointError`."""
    if is_reference_state(state):
        raise CheckpointError(
            f"{path}: a reference TRM checkpoint (weights only, no training state): start a new run from it with "
            f"init_from={path}, or evaluate it with python -m analysis.evaluate {path}"
        )
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or "model" not in state:
        raise CheckpointError(f"{path}: not a trm-jd checkpoint (format {CHECKPOINT_FORMAT} with model state expected)")
    return state


def load_model_state(model: torch.nn.Module, state: dict[str, Tensor], source: Path | str) -> None:
    """Load weights with clear errors; a puzzle table of another size restarts from the mean of the old rows."""
    if not isinstance(state, dict) or not all(isinstance(value, Tensor) for value in state.values()):
        raise CheckpointError(f"{source}: its model state is not a dict of tensors")
    state = {key.replace("_orig_mod.", ""): value for key, value in state.items()}
    own = model.state_dict()
    table_key = "puzzle_embedding.weights"
    if table_key in state and table_key in own and state[table_key].shape != own[table_key].shape:
        old = state[table_key]
        if old.shape[1:] != own[table_key].shape[1:]:
            raise CheckpointError(
                f"{source}: checkpoint does not fit this model: puzzle embedding width {tuple(old.shape)} "
                f"vs the model's {tuple(own[table_key].shape)}"
            )
        print(f"[checkpoint] puzzle embedding has {old.shape[0]} rows, the dataset needs {own[table_key].shape[0]}: re-initialised from their mean")
        state[table_key] = old.mean(dim=0, keepdim=True).expand_as(own[table_key]).clone()
    q_head = [key for key in state if key.startswith("core.q_head.") and key not in own]
    if q_head and not any(key.startswith("core.q_head.") for key in own):
        print("[checkpoint] its Q-head is not loaded: this model has none (arch.no_act=true, the JD study's trmjd; its loader drops it too)")
        state = {key: value for key, value in state.items() if key not in q_head}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        details = "; ".join(
            part
            for part in (
                f"missing {missing[:4]}" if missing else "",
                f"unexpected {unexpected[:4]}" if unexpected else "",
                f"shape mismatch {mismatched[:4]}" if mismatched else "",
            )
            if part
        )
        raise CheckpointError(f"{source}: checkpoint does not fit this model (another arch or size?): {details}")
    model.load_state_dict(state)
