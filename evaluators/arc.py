"""ARC evaluator: undo each augmentation, vote across augmented copies, score pass@K, write a submission.

For every test example the model predicts a token canvas. The evaluator decodes the grid at the
canvas' top-left corner (``dataset.arc_augment.tokens_to_grid``), maps it back to the original
puzzle's frame with the inverse of the puzzle copy's augmentation (parsed from its name), and files
it under (base puzzle, test input), where the test input is the example's position within its puzzle
in the test split.

Voting rule, per (base puzzle, test input): identical grids pool their votes; candidates are ranked
by vote count, then by the mean halting confidence ``sigmoid(q_halt_logit)`` of their votes, then by
the grid itself (for determinism). Predictions that are not a valid grid cast no vote.
``pass@K`` is 1 for a test input whose true output is among the top K candidates; a puzzle scores
the mean over its test inputs, and ``ARC/pass@K`` is the mean over the puzzles of
``test_puzzles.json`` (a puzzle or test input with no prediction scores 0).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from dataset.arc_augment import Augmentation, parse_name, tokens_to_grid
from dataset.atomic import atomic_write_text
from dataset.common import DatasetError, DatasetMetadata, concatenated_index, read_identifiers, read_metadata, read_split_parts

BLANK_SUBMISSION_GRID = [[0]]


@dataclass(frozen=True)
class _Prediction:
    """One test example's prediction in the original puzzle's frame (``grid`` None: not a valid grid)."""

    base: str
    test_index: int
    grid: np.ndarray | None
    confidence: float


@dataclass
class _Candidate:
    grid: np.ndarray
    votes: int = 0
    confidence_sum: float = 0.0

    @property
    def mean_confidence(self) -> float:
        return self.confidence_sum / self.votes


def _grid_key(grid: np.ndarray) -> tuple[tuple[int, ...], bytes]:
    return tuple(grid.shape), np.ascontiguousarray(grid, dtype=np.uint8).tobytes()


def rank_candidates(predictions: Sequence[tuple[np.ndarray, float]]) -> list[_Candidate]:
    """Pool identical grids and rank them: most votes first, then highest mean confidence."""
    pooled: dict[tuple[tuple[int, ...], bytes], _Candidate] = {}
    for grid, confidence in predictions:
        candidate = pooled.setdefault(_grid_key(grid), _Candidate(grid))
        candidate.votes += 1
        candidate.confidence_sum += confidence
    ordered = sorted(pooled.items(), key=lambda item: (-item[1].votes, -item[1].mean_confidence, item[0]))
    return [candidate for _, candidate in ordered]


class ARCEvaluator:
    """Scores ARC predictions by pass@K with voting across augmentations (see the module docstring)."""

    required_outputs = {"preds", "q_halt_logits"}

    def __init__(self, dataset_path: str | Path, pass_ks: Sequence[int] = (1, 2, 5, 10), submission_k: int = 2) -> None:
        if not pass_ks or any(int(k) < 1 for k in pass_ks):
            raise ValueError(f"pass_ks must be positive integers, got {list(pass_ks)}")
        if submission_k < 1:
            raise ValueError(f"submission_k must be >= 1, got {submission_k}")
        self.dataset_path = Path(dataset_path)
        self.pass_ks = tuple(int(k) for k in pass_ks)
        self.submission_k = int(submission_k)

        metadata = read_metadata(self.dataset_path)
        if metadata.kind != "arc":
            raise DatasetError(f"{self.dataset_path}: ARCEvaluator needs an ARC dataset, this one is {metadata.kind!r}")
        self._identifiers = read_identifiers(self.dataset_path)
        self._test_puzzles = self._read_test_puzzles()
        self._test_puzzle_indices, self._test_puzzle_identifiers = self._read_test_index(metadata)
        self._names: dict[int, tuple[str, Augmentation]] = {}
        self._predictions: dict[int, _Prediction] = {}

    def _read_test_puzzles(self) -> dict[str, Any]:
        path = self.dataset_path / "test_puzzles.json"
        if not path.is_file():
            raise DatasetError(f"{path} is missing: build the dataset with python -m dataset.build_arc_dataset")
        try:
            puzzles = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise DatasetError(f"{path}: not valid JSON ({error})") from error
        if not isinstance(puzzles, dict):
            raise DatasetError(f"{path}: expected an object mapping puzzle names to puzzles")
        return puzzles

    def _read_test_index(self, metadata: DatasetMetadata) -> tuple[np.ndarray, np.ndarray]:
        """The test split's ``puzzle_indices`` and ``puzzle_identifiers`` in the loader's example order
        (a reference folder's sets one after the other), to map test examples to puzzles."""
        identifiers, puzzle_indices, _ = concatenated_index(read_split_parts(self.dataset_path, "test", metadata, mmap=True))
        return puzzle_indices, identifiers

    def _parse_identifier(self, identifier: int) -> tuple[str, Augmentation]:
        if identifier not in self._names:
            if not 0 < identifier < len(self._identifiers):
                raise ValueError(f"puzzle identifier {identifier} is outside 1..{len(self._identifiers) - 1}")
            self._names[identifier] = parse_name(self._identifiers[identifier])
        return self._names[identifier]

    def begin_eval(self) -> None:
        """Forget the predictions of a previous evaluation."""
        self._predictions = {}

    def update_batch(self, batch: dict[str, Tensor], outputs: dict[str, Tensor]) -> None:
        """Record the predictions of one batch; rows with ``example_index == -1`` are padding."""
        example_indices = batch["example_index"].detach().cpu().numpy().astype(np.int64)
        identifiers = batch["puzzle_identifiers"].detach().cpu().numpy().astype(np.int64)
        preds = outputs["preds"].detach().cpu().numpy()
        confidences = torch.sigmoid(outputs["q_halt_logits"].detach().to(torch.float64)).cpu().numpy()
        total_examples = int(self._test_puzzle_indices[-1])
        for row in np.flatnonzero(example_indices >= 0):
            example = int(example_indices[row])
            if example >= total_examples:
                raise ValueError(f"example_index {example} is outside the test split's {total_examples} examples")
            puzzle = int(np.searchsorted(self._test_puzzle_indices, example, side="right") - 1)
            identifier = int(identifiers[row])
            if identifier != int(self._test_puzzle_identifiers[puzzle]):
                raise ValueError(
                    f"example {example} carries puzzle identifier {identifier}, but test/puzzle_identifiers.npy "
                    f"gives {int(self._test_puzzle_identifiers[puzzle])} for its puzzle {puzzle}"
                )
            base, augmentation = self._parse_identifier(identifier)
            grid = tokens_to_grid(preds[row])
            self._predictions[example] = _Prediction(
                base=base,
                test_index=example - int(self._test_puzzle_indices[puzzle]),
                grid=None if grid is None else augmentation.invert(grid),
                confidence=float(confidences[row]),
            )

    def _gather(self, rank: int, world_size: int) -> dict[int, _Prediction] | None:
        if world_size > 1 and dist.is_available() and dist.is_initialized():
            gathered: list[Any] | None = [None] * world_size if rank == 0 else None
            dist.gather_object(self._predictions, gathered, dst=0)
            if rank != 0:
                return None
            merged: dict[int, _Prediction] = {}
            for part in gathered or []:
                merged.update(part)
            return merged
        return self._predictions if rank == 0 else None

    def result(self, save_dir: Path | None, rank: int, world_size: int) -> dict[str, float] | None:
        """Gather to rank 0, vote and score.

        Rank 0 returns ``{"ARC/pass@K": ...}`` and, when ``save_dir`` is given, writes
        ``save_dir/submission.json``; other ranks return None.
        """
        predictions = self._gather(rank, world_size)
        if predictions is None:
            return None

        votes: dict[tuple[str, int], list[tuple[np.ndarray, float]]] = {}
        for prediction in predictions.values():
            if prediction.grid is not None:
                votes.setdefault((prediction.base, prediction.test_index), []).append((prediction.grid, prediction.confidence))

        totals = dict.fromkeys(self.pass_ks, 0.0)
        submission: dict[str, list[dict[str, list[list[int]]]]] = {}
        for base, puzzle in self._test_puzzles.items():
            tests = puzzle["test"]
            solved = dict.fromkeys(self.pass_ks, 0)
            attempts_per_test = []
            for test_index, pair in enumerate(tests):
                ranked = rank_candidates(votes.get((base, test_index), []))
                expected = _grid_key(np.asarray(pair["output"], dtype=np.uint8))
                keys = [_grid_key(candidate.grid) for candidate in ranked]
                for k in self.pass_ks:
                    solved[k] += expected in keys[:k]
                attempts_per_test.append(self._attempts(ranked))
            submission[base] = attempts_per_test
            for k in self.pass_ks:
                totals[k] += solved[k] / max(len(tests), 1)

        if save_dir is not None:
            self._write_submission(Path(save_dir), submission)
        count = max(len(self._test_puzzles), 1)
        return {f"ARC/pass@{k}": totals[k] / count for k in self.pass_ks}

    def _attempts(self, ranked: list[_Candidate]) -> dict[str, list[list[int]]]:
        """The top ``submission_k`` grids; missing attempts repeat the best one, or a blank 1x1 grid."""
        grids = [candidate.grid.tolist() for candidate in ranked[: self.submission_k]]
        filler = grids[0] if grids else BLANK_SUBMISSION_GRID
        grids += [filler] * (self.submission_k - len(grids))
        return {f"attempt_{i + 1}": grid for i, grid in enumerate(grids)}

    @staticmethod
    def _write_submission(save_dir: Path, submission: dict[str, Any]) -> None:
        """Write ``submission.json`` atomically (a reader never sees a half-written file)."""
        atomic_write_text(save_dir / "submission.json", json.dumps(submission))
