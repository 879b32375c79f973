"""Graceful stops: the first SIGTERM or SIGINT asks the run to stop at the next step boundary.

The trainer checks :attr:`StopSignals.received` after each optimizer step, writes a checkpoint and
returns. A second signal of either kind stops at once, without a checkpoint (``KeyboardInterrupt``
for SIGINT, ``SystemExit(128 + signal)`` for SIGTERM); checkpoints are written atomically, so the
previous ones stay valid either way.
"""

from __future__ import annotations

import os
import signal
from types import FrameType, TracebackType
from typing import Any

HANDLED = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """Context manager that installs the handlers (main thread only; a no-op elsewhere) and restores the old ones."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        for sig in HANDLED:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay with their old handlers
                pass
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            self._restore()
            _say(f"\n{name} received again: stopping now, without a checkpoint (the previous checkpoints stay valid)\n")
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        self.received = name
        _say(f"\n{name} received: stopping after this step with a checkpoint (send it again to stop at once)\n")


def stopped_at_once_status(error: BaseException) -> str | None:
    """The run status for the exception a second signal raises (None for any other exception)."""
    if isinstance(error, KeyboardInterrupt):
        return "stopped by a second SIGINT, without a new checkpoint"
    if isinstance(error, SystemExit) and error.code == 128 + signal.SIGTERM:
        return "stopped by a second SIGTERM, without a new checkpoint"
    return None


class StartupSignals:
    """Before training starts (imports, data, model, run directory): SIGTERM/SIGINT stop at once, saying so.

    Without it the default action would end the process silently. :class:`StopSignals` takes over
    during training; the previous handlers come back on exit.
    """

    def __init__(self) -> None:
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StartupSignals:
        for sig in HANDLED:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    @staticmethod
    def _handle(signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        _say(f"\n{name} received before training started: stopped (no step was trained, no checkpoint written)\n")
        raise SystemExit(128 + signum)


def _say(message: str) -> None:
    """Write to stderr from a signal handler (``print`` may be in use by the interrupted code)."""
    try:
        os.write(2, message.encode())
    except OSError:
        pass
