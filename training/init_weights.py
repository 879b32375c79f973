"""Start a new run from another checkpoint's weights (``init_from=PATH``): fine-tuning.

``PATH`` is a run directory (its best checkpoint, ``checkpoints/best.pt``, when it keeps one, else its
newest) or checkpoint of this toolkit (its EMA weights when the run kept them, else its live weights;
``best_raw.pt``: the live weights), or a reference TRM checkpoint ``step_N`` (or the folder holding it; see
:mod:`training.reference_checkpoint`). Only the weights are taken: the optimizers, the learning-rate
schedule, the data position and the RNG streams start fresh, as in any new run, which writes its own
run directory. Weights are matched by name and shape; the puzzle-embedding table is re-initialised from
the mean of the old rows when the new dataset has another number of puzzles (the reference's rule).
The run's own ``arch.*`` decides the model: values that differ from the checkpoint's config without
changing a shape (``H_cycles``, ``halt_max_steps``, ...) are reported, not refused, since fine-tuning
with other recursion settings is a use of its own (the JD study's sweep does it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from models.recursive_reasoning.act import ACTModel
from training.checkpoint import BEST_RAW_NAME, CheckpointError, load_checkpoint, load_model_state, read_state, resolve_weights
from training.reference_checkpoint import is_reference_state, read_reference_checkpoint

SHAPE_NEUTRAL_ARCH_KEYS = (
    "H_cycles",
    "L_cycles",
    "num_heads",
    "halt_max_steps",
    "halt_exploration_prob",
    "no_ACT_continue",
    "pos_encodings",
    "rope_theta",
    "rms_norm_eps",
    "loss_type",
    "puzzle_emb_len",
    "forward_dtype",
    "dropout",
)
"""Architecture values a checkpoint's weights do not pin down; a difference is reported."""


def resolve_init_from(path_text: str) -> Path:
    """The checkpoint file ``init_from`` names (before any model is built): a run directory gives its best."""
    try:
        return resolve_weights(path_text)
    except CheckpointError as error:
        raise CheckpointError(f"init_from: {error}") from None


def init_weights_from(model: ACTModel, path: Path, run_config: dict[str, Any]) -> list[str]:
    """Load ``path``'s weights into ``model`` (see the module docstring); return notes for the user.

    ``run_config`` is the new run's ``TrainConfig.model_dump(mode="json")``.
    Raises :class:`CheckpointError` when the weights do not fit, naming the keys.
    """
    state = read_state(path)
    if is_reference_state(state):
        reference = read_reference_checkpoint(path, state, data_paths=run_config["data_paths"])
        weights, notes = reference.model_state, list(reference.notes)
        checkpoint_arch = {
            key: value for key, value in reference.config["arch"].items() if reference.sources.get(f"arch.{key}", "").startswith("all_config.yaml")
        }
        what = "reference checkpoint"
    else:
        own = load_checkpoint(path)
        ema = None if path.name == BEST_RAW_NAME else own.get("ema")  # the live weights' best keeps the live weights
        weights, notes = _with_ema(own["model"], ema), []
        checkpoint_arch = (own.get("config") or {}).get("arch", {})
        what = "checkpoint (EMA weights)" if ema else "checkpoint"
    bad = [key for key, value in weights.items() if value.is_floating_point() and not bool(torch.isfinite(value).all())]
    if bad:
        raise CheckpointError(
            f"init_from: {path} holds non-finite weights (NaN or Inf in {bad[:4]}{' and more' if len(bad) > 4 else ''}); "
            "a run from them could not learn: choose an earlier checkpoint"
        )
    load_model_state(model, weights, path)
    differences = [
        f"arch.{key}: {checkpoint_arch[key]!r} -> {run_config['arch'][key]!r}"
        for key in SHAPE_NEUTRAL_ARCH_KEYS
        if key in checkpoint_arch and key in run_config["arch"] and checkpoint_arch[key] != run_config["arch"][key]
    ]
    if differences:
        notes.append(f"this run's architecture differs from the checkpoint's where the weights cannot tell: {'; '.join(differences)}")
    return [f"weights from the {what} {path}", *notes]


def _with_ema(weights: dict[str, Tensor], ema: dict[str, Tensor] | None) -> dict[str, Tensor]:
    if not ema:
        return weights
    shadow = {key.replace("_orig_mod.", ""): value for key, value in ema.items()}
    return {key: shadow.get(key.replace("_orig_mod.", ""), value) for key, value in weights.items()}
