"""CPU thread choice (training/threads.py): the same count whatever the load; a busy machine gets a suggestion."""

from __future__ import annotations

import doctest
from pathlib import Path

import pytest
import torch

import training.threads
from tests.conftest import tiny_overrides
from training.threads import choose_threads

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_docstring_examples_run() -> None:
    assert doctest.testmod(training.threads).failed == 0


def test_the_load_never_changes_the_thread_count_only_the_note() -> None:
    assert choose_threads(None, CPU, default=8, cores=8, load=0.0) == (8, None)
    threads, note = choose_threads(None, CPU, default=8, cores=8, load=5.2)
    assert threads == 8 and "load 5.2 on 8 cores" in note and "threads=3" in note and "other numbers" in note
    threads, note = choose_threads(None, CPU, default=2, cores=2, load=9.0)
    assert threads == 2 and "threads=1" in note  # the suggestion is never 0
    shared, note = choose_threads(None, CPU, default=8, cores=8, load=0.0, local_ranks=4)
    assert shared == 2 and note is None  # each rank's share of the cores, load or not
    assert choose_threads(None, CPU, default=8, cores=8, load=7.0, local_ranks=4)[0] == 2


def test_the_config_value_and_cuda_keep_their_choice() -> None:
    assert choose_threads(4, CPU, default=2, cores=2, load=9.0) == (4, None)
    assert choose_threads(None, CUDA, default=16, cores=16, load=30.0) == (16, None)


def test_threads_is_a_validated_config_key(sudoku_data: Path, tmp_path: Path) -> None:
    from pretrain import compose_config
    from training.config import ConfigError

    config = compose_config(tiny_overrides(sudoku_data, tmp_path, threads=1))
    assert config.threads == 1
    with pytest.raises(ConfigError, match="threads"):
        compose_config(tiny_overrides(sudoku_data, tmp_path, threads=0))
