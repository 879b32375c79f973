"""Shared by the reference_format tests (tests/*/test_reference_format.py)."""

from __future__ import annotations

from tests.conftest import FIXTURES

FIXTURE = FIXTURES / "reference"
