"""The command line shared by the builders that either import a CSV or generate puzzles (Sudoku, Maze)."""

from __future__ import annotations

import argparse
import errno
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dataset.common import DatasetError


def csv_or_generate_parser(description: str, *, puzzle: str, csv_name: str, num_aug_help: str) -> tuple[argparse.ArgumentParser, Any]:
    """A parser with the common options; returns it and the "generate" argument group to extend."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--output-dir", required=True, help="dataset folder to create")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output-dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-aug", type=int, default=0, help=num_aug_help)
    source = parser.add_argument_group(f"import a {csv_name} CSV")
    source.add_argument("--input-csv", help="train CSV (source,question,answer,rating)")
    source.add_argument("--test-csv", help="test CSV (same format; never augmented)")
    source.add_argument("--subsample-size", type=int, help="keep this many random train rows")
    generated = parser.add_argument_group(f"generate {puzzle}")
    generated.add_argument("--generate", action="store_true")
    return parser, generated


def parse_csv_or_generate(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse, then check that exactly one source was chosen and its options fit it."""
    args = parser.parse_args(argv)
    if args.generate == (args.input_csv is not None):
        parser.error("pass exactly one of --generate or --input-csv")
    if args.generate and (args.test_csv or args.subsample_size is not None):
        parser.error("--test-csv and --subsample-size go with --input-csv, not --generate")
    return args


def run_build(build: Callable[[], Path]) -> None:
    """Run a builder; bad input ends the program with one ``error:`` line."""
    try:
        path = build()
    except (DatasetError, ValueError) as error:
        raise SystemExit(f"error: {error}") from error
    except OSError as error:  # a full disk, a read-only folder: the staging folder is already removed
        reason = "no space left on the device" if error.errno == errno.ENOSPC else error.strerror
        raise SystemExit(f"error: cannot write the dataset ({reason}{f': {error.filename}' if error.filename else ''}); nothing was left") from None
    print(f"wrote {path}")


def csv_provenance(input_csv: str | Path, test_csv: str | Path | None, subsample_size: int | None, num_aug: int, seed: int) -> dict[str, Any]:
    """What ``metadata.json`` records about a CSV import."""
    return {
        "source": "csv",
        "input_csv": str(input_csv),
        "test_csv": None if test_csv is None else str(test_csv),
        "subsample_size": subsample_size,
        "num_aug": num_aug,
        "seed": seed,
    }
