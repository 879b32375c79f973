"""Does the model need the puzzle identifier? The test split evaluated with each example's own identifier
(``true``), the blank identifier 0 (``blank``: what a puzzle never seen in training gets) and another
puzzle's identifier (``random``: drawn uniformly among the other non-blank identifiers, the same draw for
every rerun: a fixed seed), side by side with their intervals."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from dataset.puzzle_dataset import PuzzleDataset

IDENTIFIER_VARIANTS = ("true", "blank", "random")
BLANK_IDENTIFIER = 0
TRUE_IDENTIFIERS = "true_puzzle_identifiers"
"""A test batch's own identifiers, kept beside the ``puzzle_identifiers`` the model is given when they differ."""


def parse_identifier_variants(text: str) -> tuple[str, ...]:
    """``"true,blank,random"`` -> the variants, in the order given.

    Example:
        >>> parse_identifier_variants("blank,true")
        ('blank', 'true')
    """
    variants = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [variant for variant in variants if variant not in IDENTIFIER_VARIANTS]
    if unknown or not variants:
        raise ValueError(f"--puzzle-ids {text!r}: unknown {unknown or 'empty list'}; accepted: comma-separated {list(IDENTIFIER_VARIANTS)}")
    return variants


def other_identifiers(identifiers: Tensor, num_identifiers: int, generator: torch.Generator) -> Tensor:
    """For each identifier, another non-blank one drawn uniformly (``num_identifiers`` counts the blank 0).

    Example:
        >>> ids = torch.tensor([1, 2, 3, 0])
        >>> other = other_identifiers(ids, 4, torch.Generator().manual_seed(0))
        >>> bool((other != ids).all()) and bool((other >= 1).all()) and bool((other <= 3).all())
        True
    """
    draw = torch.randint(1, num_identifiers - 1, identifiers.shape, generator=generator)  # among num_identifiers - 2 others
    own = identifiers.clamp_min(1)
    return torch.where(draw >= own, draw + 1, draw)


class IdentifierVariant:
    """A test split whose batches give the model the chosen kind of puzzle identifier; the true ones travel
    beside them (``true_puzzle_identifiers``), so evaluators still know which puzzle each example is."""

    def __init__(self, data: PuzzleDataset, variant: str, seed: int = 0) -> None:
        self.data, self.variant, self.seed = data, variant, seed
        self.total_examples, self.global_batch_size = data.total_examples, data.global_batch_size

    def test_batches(self) -> Iterator[dict[str, Tensor]]:
        generator = torch.Generator().manual_seed(self.seed)
        for batch in self.data.test_batches():
            identifiers = batch["puzzle_identifiers"]
            if self.variant == "blank":
                identifiers = torch.full_like(identifiers, BLANK_IDENTIFIER)
            elif self.variant == "random":
                identifiers = other_identifiers(identifiers, self.data.metadata.num_puzzle_identifiers, generator).to(identifiers.dtype)
            yield {**batch, "puzzle_identifiers": identifiers, TRUE_IDENTIFIERS: batch["puzzle_identifiers"]}


def identifier_table(by_variant: dict[str, dict[str, float]]) -> list[str]:
    """One line per identifier variant: exact accuracy with its Wilson interval, token accuracy, ARC's pass@K.

    Example:
        >>> row = {"eval/exact_accuracy": 0.8, "eval/exact_accuracy_ci_low": 0.7, "eval/exact_accuracy_ci_high": 0.9, "eval/accuracy": 0.95}
        >>> print("\\n".join(identifier_table({"true": row})))
        puzzle ids  exact [95% CI]            token acc.
        true        0.8000 [0.7000, 0.9000]       0.9500
    """
    extra = sorted({key for row in by_variant.values() for key in row if key.startswith("ARC/")})
    lines = [f"{'puzzle ids':<10}  {'exact [95% CI]':<24}  {'token acc.':>10}" + "".join(f"  {key:>12}" for key in extra)]
    for variant, row in by_variant.items():
        interval = f"{row['eval/exact_accuracy']:.4f} [{row['eval/exact_accuracy_ci_low']:.4f}, {row['eval/exact_accuracy_ci_high']:.4f}]"
        lines.append(
            f"{variant:<10}  {interval:<24}  {row['eval/accuracy']:>10.4f}" + "".join(f"  {row.get(key, float('nan')):>12.4f}" for key in extra)
        )
    return lines
