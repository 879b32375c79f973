"""One training process per run directory, for as long as it trains.

A new run claims its directory exclusively when it creates it (:mod:`training.run_dir`); this lock covers
what that claim cannot: a second process that *continues* the same run (``resume=true`` or
``load_checkpoint=RUN``: a Slurm requeue while the old job still runs, a command started twice), which
would otherwise write the same checkpoints and metrics. Rank 0 holds an exclusive ``flock`` on
``RUN_DIR/.lock`` from before it restores anything until the run ends. The operating system releases it
when the process dies, however it dies, so a lock left by a killed run never blocks the next one (the
file says who held it last, for the error message). ``flock`` needs a local or NFSv4 file system.

Example:
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> lock = RunLock.acquire(folder)
    >>> RunLock.acquire(folder)
    Traceback (most recent call last):
    ...
    training.run_lock.RunInUseError: ...
    >>> lock.release(); RunLock.acquire(folder).release()
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

LOCK_FILE = ".lock"


class RunInUseError(RuntimeError):
    """Another live process trains in this run directory."""


class RunLock:
    """An exclusive lock on a run directory, held until :meth:`release` or the process's end."""

    def __init__(self, path: Path, fd: int, previous: str = "") -> None:
        self.path = path
        self._fd: int | None = fd
        self.previous = previous  # who held it last ("" for a new lock): a process that is gone

    @classmethod
    def acquire(cls, run_dir: Path) -> RunLock:
        """Lock ``run_dir`` (which must exist) or raise :class:`RunInUseError` naming the holder."""
        path = Path(run_dir) / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 512).decode("utf-8", errors="replace").strip() or "another process"
            os.close(fd)
            raise RunInUseError(
                f"run directory {run_dir} is in use by a training process that is still running ({holder}); two processes "
                "would write the same checkpoints and metrics. Wait for it to end or stop it, then resume"
            ) from None
        previous = os.read(fd, 512).decode("utf-8", errors="replace").strip()
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        return cls(path, fd, previous)

    @staticmethod
    def is_held(run_dir: Path) -> bool:
        """Whether a live process holds ``run_dir``'s lock (creates nothing)."""
        path = Path(run_dir) / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def release(self) -> None:
        """Unlock (the file stays; the next run overwrites who holds it)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:  # a trainer that failed while starting lets its run directory go with it
        self.release()
