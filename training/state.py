"""Small pieces of training state that are saved in checkpoints: position, RNG streams, ACT carries."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
from torch import Tensor

from models.recursive_reasoning.act import ACTCarry, LatentState


@dataclass
class Progress:
    """Where training is: optimizer steps taken and the next batch of the data stream."""

    step: int = 0
    iteration: int = 0  # data iteration (eval_interval epochs each)
    batch_in_iteration: int = 0  # next batch to read within the iteration
    evaluations: int = 0
    skipped_nonfinite: int = 0
    consecutive_nonfinite: int = 0
    eval_pending: int = 0  # 1: the evaluation due at this step has not finished (it is redone on resume)

    def state_dict(self) -> dict[str, int]:
        """The record as plain ints (the checkpoint's ``progress``)."""
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take the saved record's values, in place (components hold this object)."""
        loaded = Progress.from_dict(state)
        for field in fields(self):
            setattr(self, field.name, getattr(loaded, field.name))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Progress:
        known = {f.name for f in fields(cls)}
        return cls(**{key: int(value) for key, value in data.items() if key in known})


def seed_everything(seed: int) -> None:
    """Seed every global RNG stream of the process (torch, CUDA, Python's ``random``, NumPy's legacy one)."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def capture_rng() -> dict[str, Any]:
    """Every RNG stream training draws from, as checkpoint-safe values (tensors, ints, lists)."""
    numpy_state: Any = np.random.get_state()  # the legacy tuple ("MT19937", keys, pos, has_gauss, cached)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]) + [random.getstate()[2]],
        "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Run a block (an evaluation) without moving any RNG stream training draws from."""
    state = capture_rng()
    try:
        yield
    finally:
        restore_rng(state)


def carry_is_finite(carry: ACTCarry) -> bool:
    """Whether the carried latents (and logits) hold only finite numbers."""
    tensors = [carry.latent.z_H, carry.latent.z_L] + ([carry.prev_logits] if carry.prev_logits is not None else [])
    return all(bool(torch.isfinite(tensor).all()) for tensor in tensors)


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    python = state["python"]
    random.setstate((3, tuple(int(v) for v in python[:-1]), python[-1]))
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state[0], numpy_state[1].numpy().astype(np.uint32), *numpy_state[2:]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def carry_to_dict(carry: ACTCarry) -> dict[str, Any]:
    return {
        "z_H": carry.latent.z_H.cpu(),
        "z_L": carry.latent.z_L.cpu(),
        "steps": carry.steps.cpu(),
        "halted": carry.halted.cpu(),
        "data": {key: value.cpu() for key, value in carry.data.items()},
        "prev_logits": None if carry.prev_logits is None else carry.prev_logits.cpu(),
        "prev_logits_across_samples": carry.prev_logits_across_samples,
    }


def carry_from_dict(data: dict[str, Any], device: torch.device, latent_dtype: torch.dtype | None = None) -> ACTCarry:
    """The carry :func:`carry_to_dict` saved, on ``device`` (latents cast to ``latent_dtype`` when given)."""

    def to(value: Tensor) -> Tensor:
        return value.to(device)

    def latent(value: Tensor) -> Tensor:
        return value.to(device=device, dtype=latent_dtype or value.dtype)

    prev = data.get("prev_logits")
    return ACTCarry(
        latent=LatentState(latent(data["z_H"]), latent(data["z_L"])),
        steps=to(data["steps"]),
        halted=to(data["halted"]),
        data={key: to(value) for key, value in data["data"].items()},
        prev_logits=None if prev is None else to(prev),
        prev_logits_across_samples=bool(data.get("prev_logits_across_samples", False)),
    )
