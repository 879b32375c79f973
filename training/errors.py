"""Errors of the training layer that several of its modules raise (kept apart so that none imports another back)."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or does not fit the model or config."""
