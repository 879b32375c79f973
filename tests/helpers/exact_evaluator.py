"""Shared by the exact_evaluator tests (tests/*/test_exact_evaluator.py)."""

from __future__ import annotations

import torch


def _batch(labels: list[list[int]], example_index: list[int]) -> dict[str, torch.Tensor]:
    return {"labels": torch.tensor(labels), "example_index": torch.tensor(example_index)}
