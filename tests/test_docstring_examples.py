"""The runnable examples in the docstrings stay true."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES_WITH_EXAMPLES = [
    "jd.aggregators",
    "jd.projector",
    "jd.splits",
    "models.ema",
    "models.losses",
    "models.optimizers",
    "models.per_sample",
    "models.registry",
    "models.sparse_embedding",
    "training.hard_sampling",
    "training.numerics",
    "training.run_lock",
    "training.threads",
]


@pytest.mark.parametrize("name", MODULES_WITH_EXAMPLES)
def test_docstring_examples_run(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS, verbose=False)
    assert result.attempted > 0, f"{name} has no examples any more; drop it from MODULES_WITH_EXAMPLES"
    assert result.failed == 0, f"{result.failed} docstring example(s) of {name} failed (run python -m doctest -v on it)"
