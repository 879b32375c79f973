"""Crash-safe file writes for the run directory.

A file is written to a temporary sibling (``.NAME.XXXXXXXX.tmp``), flushed to disk and renamed over
``NAME``; a crash at any moment (``kill -9``, power loss) leaves either the old file or the new one,
never a torn one. A temporary file left by a killed write is never read and is removed by
:func:`remove_stale_temp_files` the next time the run directory is opened.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

_TEMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")


@contextlib.contextmanager
def atomic_open(path: Path, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary sibling of ``path`` for writing; on a clean exit it replaces ``path``.

    On an exception the temporary file is removed and ``path`` is left as it was.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open writes whole files: mode must be 'w' or 'wb', got {mode!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    make_shareable(handle)
    try:
        with os.fdopen(handle, mode) as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def make_shareable(handle: int) -> None:
    """Give a ``tempfile.mkstemp`` file (private, 0600) the permissions ``open()`` would: 0666 less the umask
    (read from ``/proc``, so that the process-wide umask is never touched; 022 where it cannot be read)."""
    mask = 0o022
    with contextlib.suppress(OSError, ValueError, StopIteration):
        status = Path("/proc/self/status").read_text(encoding="utf-8").splitlines()
        mask = int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    os.fchmod(handle, 0o666 & ~mask)


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one step (see the module docstring)."""
    with atomic_open(path, "w") as file:
        file.write(text)


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Delete the temporary files that killed writes left in ``folder``; return them.

    Only call this on a folder that no other process is writing to (the run directory of the run
    that is starting: one writer, rank 0).
    """
    if not folder.is_dir():
        return []
    stale = [path for path in folder.iterdir() if path.is_file() and _TEMP_NAME.match(path.name)]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_failure(folder: Path, error: BaseException) -> str:
    """Why a write into ``folder`` failed, in words: no space, no permission, or the error's own message."""
    if isinstance(error, OSError) and error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{folder} is not writable ({error.strerror})"
    if isinstance(error, OSError) and error.errno is not None and error.errno != errno.ENOSPC:
        return f"{error.strerror} ({error.filename})" if error.filename else str(error.strerror)
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    if (isinstance(error, OSError) and error.errno == errno.ENOSPC) or free == 0 or "unexpected pos" in str(error):
        return f"no space left on the device of {folder} ({0 if free is None else free // 2**20} MiB free)"
    return str(error).splitlines()[0] if str(error) else type(error).__name__
