"""Does the test split overlap the training split? Puzzle identifiers, and input grids.

    python -m dataset.check data/arc1concept-aug-1000
    python -m dataset.check data/demo-sudoku-4x4 --json overlap.json

Reports, for a dataset folder of this toolkit or of the reference code (the same format):

- **identifiers**: how many test puzzles' identifiers (the blank one aside) also label training puzzles.
  In ARC this is by design: an evaluation puzzle's demonstration pairs are training examples under the
  same identifier, which is how the model learns that puzzle's embedding; a test identifier unknown to
  training would be an untrained embedding row.
- **inputs**: how many test inputs equal a training input token for token, and, for ARC, how many
  equal one once each example's augmentation (read from its puzzle's name in ``identifiers.json``) is
  inverted; Sudoku and Maze record no per-example augmentation, so only identical copies are found there.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dataset.arc_augment import parse_name, tokens_to_grid
from dataset.common import DatasetError, read_identifiers, read_metadata, read_split
from dataset.metadata import SplitArrays


def example_identifiers(split: SplitArrays) -> np.ndarray:
    """Each example's puzzle identifier (``puzzle_indices`` delimits each puzzle's examples)."""
    counts = np.diff(split.puzzle_indices)
    return np.repeat(split.puzzle_identifiers, counts)


def canonical_arc_inputs(inputs: np.ndarray, identifiers: np.ndarray, names: list[str]) -> list[bytes]:
    """Each ARC input as its un-augmented grid (its shape and cells as bytes), the augmentation read from its puzzle's name."""
    out = []
    for tokens, identifier in zip(inputs, identifiers):
        grid = tokens_to_grid(np.asarray(tokens))
        if grid is None:
            out.append(b"")
            continue
        _, augmentation = parse_name(names[int(identifier)])
        original = augmentation.invert(grid)
        out.append(np.asarray(original.shape, dtype=np.int64).tobytes() + original.astype(np.uint8).tobytes())
    return out


def overlap_report(dataset: str | Path) -> dict[str, Any]:
    """The overlap counts of ``dataset`` (see the module docstring) as a JSON-ready dict."""
    metadata = read_metadata(dataset)
    train, test = read_split(dataset, "train", metadata), read_split(dataset, "test", metadata)
    blank = metadata.blank_identifier_id
    train_ids = set(train.puzzle_identifiers.tolist()) - {blank}
    test_ids = [identifier for identifier in test.puzzle_identifiers.tolist() if identifier != blank]
    report: dict[str, Any] = {
        "dataset": str(dataset),
        "kind": metadata.kind,
        "test_puzzles": int(len(test.puzzle_identifiers)),
        "test_puzzles_with_blank_identifier": int(len(test.puzzle_identifiers) - len(test_ids)),
        "test_identifiers_in_training": int(sum(identifier in train_ids for identifier in test_ids)),
    }
    train_inputs = {row.tobytes() for row in train.inputs}
    report["test_examples"] = int(len(test.inputs))
    report["test_inputs_in_training"] = int(sum(row.tobytes() in train_inputs for row in test.inputs))
    if metadata.kind == "arc":
        names = read_identifiers(dataset)
        canonical_train = set(canonical_arc_inputs(train.inputs, example_identifiers(train), names)) - {b""}
        test_canonical = canonical_arc_inputs(test.inputs, example_identifiers(test), names)
        report["test_inputs_in_training_after_inverting_augmentation"] = int(sum(key in canonical_train for key in test_canonical if key))
    return report


def report_lines(report: dict[str, Any]) -> list[str]:
    """The report in words."""
    lines = [
        f"{report['dataset']} ({report['kind']}): {report['test_puzzles']} test puzzles, {report['test_examples']} test examples",
        f"  test puzzles whose identifier labels training puzzles: {report['test_identifiers_in_training']}"
        f" (blank identifier: {report['test_puzzles_with_blank_identifier']})",
        f"  test inputs identical to a training input: {report['test_inputs_in_training']}",
    ]
    if "test_inputs_in_training_after_inverting_augmentation" in report:
        lines.append(
            f"  test inputs equal to a training input once augmentation is inverted: {report['test_inputs_in_training_after_inverting_augmentation']}"
        )
    else:
        lines.append("  (no per-example augmentation is recorded for this kind: augmented copies are not detected)")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dataset.check", description="How much a dataset's test split overlaps its training split.")
    parser.add_argument("dataset", nargs="+", help="dataset folder(s) (this toolkit's or the reference code's format)")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the reports as JSON")
    args = parser.parse_args(argv)
    try:
        reports = [overlap_report(path) for path in args.dataset]
    except (DatasetError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for report in reports:
        print("\n".join(report_lines(report)))
    if args.json:
        from dataset.atomic import atomic_write_text

        atomic_write_text(Path(args.json), json.dumps(reports, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
