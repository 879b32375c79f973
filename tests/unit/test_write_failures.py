"""Writes that cannot happen (no space, no permission, no such place) are one-line errors, and nothing is lost.

This file holds the unit tests; the others are in tests/integration/test_write_failures.py.
"""

from __future__ import annotations

import errno
from pathlib import Path

from dataset.atomic import write_failure


def test_the_cause_is_named(tmp_path: Path) -> None:
    assert "no space left on the device" in write_failure(tmp_path, OSError(errno.ENOSPC, "No space left on device"))
    assert "no space left" in write_failure(tmp_path, RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64"))
    assert "is not writable (Read-only file system)" in write_failure(tmp_path, OSError(errno.EROFS, "Read-only file system"))
    assert write_failure(tmp_path, OSError(errno.EIO, "Input/output error")) == "Input/output error"
