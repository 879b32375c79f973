"""Every runnable example in the project's docstrings runs, and none disappears unnoticed.

Modules are discovered (every module of the packages, as ``tests/unit/test_architecture.py`` lists them), so a
new example runs without being registered; :data:`EXAMPLES` pins how many each module holds, so deleting
one fails here until the table says so.
"""

from __future__ import annotations

import doctest
import importlib

import pytest

from tests.unit.test_architecture import _modules

EXAMPLES = {
    "analysis.depth": 4,
    "analysis.stats": 3,
    "evaluators.depth": 13,
    "evaluators.puzzle_ids": 6,
    "jd.aggregators": 3,
    "jd.diagnostics": 1,
    "jd.projector": 4,
    "jd.scalarizers": 3,
    "jd.splits": 2,
    "models.ema": 5,
    "models.layers": 1,
    "models.losses": 2,
    "models.optimizers": 5,
    "models.per_sample": 7,
    "models.registry": 3,
    "models.sparse_embedding": 6,
    "training.best_checkpoint": 6,
    "training.cadence": 3,
    "training.config": 2,
    "training.evaluation": 1,
    "training.hard_sampling": 3,
    "training.hub": 1,
    "training.numerics": 1,
    "training.reference_checkpoint": 3,
    "training.run_lock": 5,
    "training.stateful": 2,
    "training.threads": 3,
    "training.train_metrics": 3,
}
"""Examples (``>>>`` lines) per module."""


SKIPPED = ("pretrain",)  # importing it installs signal handlers only under __main__, but it has no examples either


MODULES = sorted(name for name in _modules() if name not in SKIPPED and not name.endswith("__main__"))


def _doctests(name: str) -> list[doctest.DocTest]:
    module = importlib.import_module(name)
    return [test for test in doctest.DocTestFinder(exclude_empty=True).find(module, name) if test.name.startswith(name)]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str) -> None:
    tests = _doctests(name)
    assert sum(len(test.examples) for test in tests) == EXAMPLES.get(name, 0), (
        f"{name}'s docstrings hold {sum(len(t.examples) for t in tests)} example lines, EXAMPLES says {EXAMPLES.get(name, 0)}: "
        "an example was added or removed; update EXAMPLES"
    )
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    for test in tests:
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) of {name} failed (run python -m doctest -v on it)"
