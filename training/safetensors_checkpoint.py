"""Weights exchanged as ``safetensors``: ``model.safetensors`` (the model's tensors, no code, no pickle) and
``config.json`` beside it (the run's config, the dataset sizes the model was built for, the step and which
weights these are), the layout ``python -m analysis.export ... --format safetensors`` writes and the Hub
serves. It loads wherever a checkpoint does, as weights only (no optimizer state: ``init_from``, evaluation,
the visualiser)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor

from training.errors import CheckpointError

WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"
EXPORT_FORMAT = "trm-jd-safetensors-1"


def write_safetensors(folder: Path, weights: dict[str, Tensor], record: dict[str, Any]) -> list[Path]:
    """Write ``folder/model.safetensors`` and ``folder/config.json`` (``record`` plus the format name); return both paths."""
    from safetensors.torch import save_file

    from dataset.atomic import atomic_write_text

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: value.detach().cpu().contiguous().clone() for name, value in weights.items()}
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": EXPORT_FORMAT})
    atomic_write_text(folder / CONFIG_FILE, json.dumps({"format": EXPORT_FORMAT, **record}, indent=2))
    return [folder / WEIGHTS_FILE, folder / CONFIG_FILE]


def read_safetensors(path: Path) -> dict[str, Any]:
    """``model.safetensors`` with its ``config.json`` as a weights-only checkpoint dict (``model``, ``config``, ``data``, ``step``)."""
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise CheckpointError(f"{path}: reading safetensors needs the safetensors package (pip install safetensors)") from None
    config_path = path.parent / CONFIG_FILE
    try:
        record = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path}: its {CONFIG_FILE} is missing or unreadable ({error}); it says how to rebuild the model") from None
    if not isinstance(record, dict) or record.get("format") != EXPORT_FORMAT:
        found = record.get("format") if isinstance(record, dict) else record
        raise CheckpointError(f"{config_path}: not a trm-jd export (format {EXPORT_FORMAT!r} expected, got {found!r})")
    try:
        weights = load_file(str(path))
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error type for a corrupt header
        raise CheckpointError(f"{path}: unreadable safetensors file ({type(error).__name__}: {str(error)[:200]})") from None
    return {"model": weights, "config": record.get("config"), "data": record.get("data"), "step": int(record.get("step", 0)), "ema": None}
