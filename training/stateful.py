"""What a component that owns checkpointed state provides: ``state_dict`` and ``load_state_dict``.

The model, the optimizers, the EMA, the data feed (hard-example counts), the JD step, the progress
record, the RNG streams and the ACT carries all satisfy it, and each registers itself with the
:class:`training.checkpointer.Checkpointer`; nothing else writes or reads a checkpoint's keys.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Stateful(Protocol):
    """State that is saved in a checkpoint and restored from it.

    Example:
        >>> from training.state import Progress
        >>> isinstance(Progress(), Stateful)
        True
    """

    def state_dict(self) -> Any:
        """The state to save (tensors, numbers, strings, lists and dicts only: ``weights_only`` loading)."""
        ...

    def load_state_dict(self, state: Any) -> None:
        """Restore what :meth:`state_dict` returned; raise ``ValueError`` (or ``KeyError``/``TypeError``/
        ``RuntimeError``) naming what does not fit."""
        ...
