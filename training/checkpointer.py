"""The run's checkpoints: what they hold, when they are written, and how a run comes back from one.

Every component that owns state registers it (:meth:`Checkpointer.register`, or
:meth:`Checkpointer.register_rank` for state each rank keeps for itself: RNG streams, ACT carries);
:meth:`Checkpointer.save` writes them all and :meth:`Checkpointer.restore` loads them back in
registration order, so a new capability adds one ``register`` call and never edits save or restore.
The checkpoint format is that of :mod:`training.checkpoint` (one ``.pt`` of plain values per step).

The policy lives here too: a checkpoint every ``checkpoint_interval`` steps and before each evaluation
(``checkpoint_every_eval``), only after a finite step; ``keep_last`` newest kept; saving the same
progress twice writes once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from training.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, load_model_state, save_checkpoint, write_checkpoint
from training.config import trajectory_changes
from training.distributed import DistInfo
from training.state import Progress, capture_rng, restore_rng
from training.stateful import Stateful

_LOAD_ERRORS = (ValueError, KeyError, TypeError, RuntimeError, IndexError)


@dataclass
class _Entry:
    key: str
    state: Stateful
    what: str  # named in errors: "the optimizer state"
    spread: bool  # its state_dict's keys are top-level keys of the checkpoint (the optimizers)
    on_absent: Callable[[], None] | None  # the checkpoint has no (or a None) value: None means required


class ModelWeights:
    """The model as checkpoint state, loaded with :func:`training.checkpoint.load_model_state`'s named mismatches."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        load_model_state(self.model, state, "its model state")


class RngStreams:
    """This process's RNG streams (torch, CUDA, Python, NumPy) as checkpoint state."""

    def state_dict(self) -> dict[str, Any]:
        return capture_rng()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        restore_rng(state)


class _NoState:
    """A component that is switched off (no EMA): saved as ``None``, nothing to restore."""

    def state_dict(self) -> None:
        return None

    def load_state_dict(self, state: Any = None) -> None:
        return None


NO_STATE = _NoState()


class Checkpointer:
    """Saves and restores every registered piece of training state; decides when a checkpoint is due.

    Args:
        dist_info: this process's rank and world size (every rank takes part in a save; rank 0 writes).
        keep_last: how many checkpoints a run keeps.
        interval: a checkpoint every ``interval`` optimizer steps (``None``: none on a schedule).
        every_eval: a checkpoint before every evaluation.
        static: values written as they are (the config, the data's shape).
    """

    def __init__(self, dist_info: DistInfo, *, keep_last: int, interval: int | None, every_eval: bool, static: dict[str, Any]) -> None:
        self.dist = dist_info
        self.keep_last, self.interval, self.every_eval = keep_last, interval, every_eval
        self.static = static
        self.run_dir: Path | None = None  # set by attach() once the run directory exists
        self._entries: list[_Entry] = []
        self._rank_entries: list[_Entry] = []
        self._saved: dict[str, int] | None = None  # the progress of the last checkpoint written

    def register(self, key: str, state: Stateful, what: str, *, spread: bool = False, on_absent: Callable[[], None] | None = None) -> None:
        """Save ``state`` under ``key`` (``spread``: its keys at the top level); restore it in registration order.

        ``on_absent`` runs when a checkpoint holds no value for it; without one the key is required."""
        self._entries.append(_Entry(key, state, what, spread, on_absent))

    def register_rank(self, key: str, state: Stateful, what: str) -> None:
        """Save ``state`` once per rank (under ``ranks[r][key]``); restored when the world size is the same."""
        self._rank_entries.append(_Entry(key, state, what, False, None))

    def attach(self, run_dir: Path) -> None:
        """Write into ``run_dir/checkpoints`` from now on."""
        self.run_dir = run_dir

    # ----------------------------------------------------------------------------------- saving
    def due(self, step: int, *, before_eval: bool, finite: bool) -> bool:
        """Whether a checkpoint is due after ``step`` (never after a skipped, non-finite step)."""
        if not finite:
            return False
        if before_eval:
            return self.every_eval
        return self.interval is not None and self.interval > 0 and step % self.interval == 0

    def save(self, progress: Progress) -> Path | None:
        """Write every registered state (all ranks call it; rank 0 writes). Returns the path on rank 0.

        A second call with the same progress writes nothing again."""
        assert self.run_dir is not None, "attach() the run directory first"
        if self._saved == progress.state_dict():
            return self.latest() if self.dist.is_main else None
        state = self._gather()
        self._saved = progress.state_dict()
        if state is None:
            return None
        return save_checkpoint(state, self.run_dir, progress.step, self.keep_last)

    def save_as(self, progress: Progress, path: Path) -> Path | None:
        """Write every registered state to ``path`` (all ranks call it; rank 0 writes), outside the numbered
        checkpoints: neither counted by ``keep_last`` nor replacing one of them (the best checkpoint)."""
        state = self._gather()
        return None if state is None else write_checkpoint(state, path, progress.step)

    def _gather(self) -> dict[str, Any] | None:
        """The whole checkpoint on rank 0 (``None`` on the others, which take part in the collectives)."""
        state: dict[str, Any] = {}
        for entry in self._entries:  # on every rank: some take part in a collective (the sampler's counts)
            value = entry.state.state_dict()
            state.update(value) if entry.spread else state.__setitem__(entry.key, value)
        rank_state = {entry.key: entry.state.state_dict() for entry in self._rank_entries}
        gathered: list[Any] = [rank_state]
        if self.dist.world_size > 1:
            gathered = [None] * self.dist.world_size
            dist.all_gather_object(gathered, rank_state)
        return {**state, "ranks": gathered, **self.static} if self.dist.is_main else None

    # --------------------------------------------------------------------------------- restoring
    def restore(self, path: Path, *, same_run: bool) -> None:
        """Load every registered state from ``path``; every mismatch is a :class:`CheckpointError`.

        ``same_run``: the run continues in the checkpoint's own directory (its progress counts as saved)."""
        state = load_checkpoint(path, map_location=self.dist.device)
        missing = [key for key in ("optimizer", "progress") if not isinstance(state.get(key), dict)]
        if missing:
            raise CheckpointError(
                f"{path}: not a training checkpoint (it lacks {missing}); it cannot be resumed: start a new run from its weights "
                f"with init_from={path}"
            )
        self._note_changed_settings(path, state.get("config"))
        for entry in self._entries:
            value = state if entry.spread else state.get(entry.key)
            if value is None and entry.on_absent is None:
                raise CheckpointError(f"{path}: it holds no {entry.what}; it cannot be resumed")
            _load(entry, value, path)
        self._restore_ranks(state.get("ranks") or [], path)
        progress = state["progress"]
        self._saved = {key: int(value) for key, value in progress.items()} if same_run else None

    def _note_changed_settings(self, path: Path, saved_config: Any) -> None:
        if not (isinstance(saved_config, dict) and self.dist.is_main and isinstance(self.static.get("config"), dict)):
            return
        changes = trajectory_changes(saved_config, self.static["config"])
        if changes:
            print(
                f"note: resuming {path.name} with settings that differ from its own ({'; '.join(changes[:8])}); training "
                "continues with the new ones, so it will not match an uninterrupted run of the old ones",
                flush=True,
            )

    def _restore_ranks(self, ranks: list[Any], path: Path) -> None:
        """This rank's own state (RNG streams, ACT carries), when the checkpoint was written by as many ranks."""
        if len(ranks) != self.dist.world_size:
            if self.dist.is_main:
                print(
                    f"note: {path.name} was written by {len(ranks)} rank(s), this run has {self.dist.world_size}: RNG streams "
                    "and ACT carries start fresh"
                )
            return
        own = ranks[self.dist.rank]
        for entry in self._rank_entries:
            if own.get(entry.key) is not None:
                _load(entry, own[entry.key], path)

    # ----------------------------------------------------------------------------------- reading
    def latest(self) -> Path | None:
        """The newest checkpoint of the run directory (``None`` before the first)."""
        return latest_checkpoint(self.run_dir) if self.run_dir is not None else None

    def kept_phrase(self) -> str:
        """What a run stopped by a write failure kept: its newest checkpoint, and what is lost after it."""
        latest = self.latest()
        if latest is None:
            return "no checkpoint had been written yet; free space and start again"
        return (
            f"the newest checkpoint is {latest} (step {int(latest.stem.removeprefix('step_'))}); the steps after it are not saved. "
            "Free space and resume with resume=true (they are recomputed identically)"
        )

    def last_good_phrase(self) -> str:
        """Where a diverged run's last good state is."""
        latest = self.latest()
        if latest is None:
            return "no checkpoint had been written yet"
        return f"the newest checkpoint, {latest}, holds the last good state (lower lr, or set grad_clip_norm, and resume from it)"


def _load(entry: _Entry, value: Any, path: Path) -> None:
    """``value`` into the entry's state (``None``: its ``on_absent``), errors named with ``path``."""
    try:
        if value is None:
            assert entry.on_absent is not None
            entry.on_absent()
        else:
            entry.state.load_state_dict(value)
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}") from None
    except _LOAD_ERRORS as error:
        raise CheckpointError(f"{path}: {entry.what} does not fit this run ({error})") from error
