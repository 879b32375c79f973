"""Answers at any depth: the test split scored after 1, 2, 4, ... supervision steps, under two halting rules.

``max`` runs every sample to the step budget (what training's evaluation does at ``halt_max_steps``);
``q`` stops each sample at the first step where its Q-head says halt (as ACT does in training, without
the exploration minimum), or at the budget. Budgets may exceed ``halt_max_steps``: the recursion simply
goes on from the carried latent. Every configured evaluator (exact match, ARC voting) scores every
(rule, budget) pair, so ARC's pass@K is available at every depth too.

Example (a tiny untrained TRM; at each budget ``q`` never uses more steps than ``max``):
    >>> import torch
    >>> from models.registry import build_model
    >>> from models.recursive_reasoning.config import ArchConfig
    >>> from evaluators.exact import ExactMatchEvaluator
    >>> arch = ArchConfig(hidden_size=16, num_heads=2, expansion=2, L_layers=1, H_cycles=1, L_cycles=1, halt_max_steps=2, puzzle_emb_ndim=0)
    >>> model = build_model(arch, seq_len=4, vocab_size=5, num_puzzle_identifiers=1, device=torch.device("cpu")).eval()
    >>> depth = DepthEvaluation(model, [1, 3], ("max", "q"), lambda: [ExactMatchEvaluator("eval")])
    >>> batch = {"inputs": torch.ones(2, 4, dtype=torch.long), "labels": torch.ones(2, 4, dtype=torch.long),
    ...          "puzzle_identifiers": torch.zeros(2, dtype=torch.long), "example_index": torch.arange(2)}
    >>> depth.update_batch(batch)
    >>> results = depth.result(rank=0, world_size=1)
    >>> sorted(results), results["max"][3]["mean_steps"]
    (['max', 'q'], 3.0)
    >>> all(results["q"][d]["mean_steps"] <= d for d in (1, 3))
    True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
import torch.distributed as dist
from torch import Tensor

from evaluators.base import Evaluator
from models.loss_terms import IGNORE_LABEL_ID
from models.recursive_reasoning.act import ACTModel

HALT_RULES = ("max", "q")


def parse_depths(text: str) -> list[int]:
    """``"1,2,4,8"`` -> ``[1, 2, 4, 8]`` (sorted, unique); a bad list raises ``ValueError`` saying what is accepted.

    Example:
        >>> parse_depths("8,1,2,2")
        [1, 2, 8]
    """
    try:
        depths = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        depths = []
    if not depths or depths[0] < 1:
        raise ValueError(f"--steps {text!r}: give comma-separated positive step counts, e.g. 1,2,4,8,16")
    return depths


def parse_halt_rules(text: str, no_act: bool = False) -> tuple[str, ...]:
    """``"max,q"`` -> ``("max", "q")``; ``q`` needs a model with a Q-head (``no_act``: it has none)."""
    rules = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [rule for rule in rules if rule not in HALT_RULES]
    if unknown or not rules:
        raise ValueError(f"--halt {text!r}: unknown {unknown or 'empty list'}; accepted: comma-separated {list(HALT_RULES)}")
    if "q" in rules and no_act:
        raise ValueError("--halt q: this model has no Q-head (arch.no_act=true), so it never halts by itself; use --halt max")
    return rules


def halt_signal(model: ACTModel, outputs: dict[str, Tensor]) -> Tensor:
    """``[B]`` bool: the Q-head says halt (``q_halt > 0`` without Q-continue, else ``q_halt > q_continue``)."""
    if model.config.no_act:
        return torch.zeros_like(outputs["q_halt_logits"], dtype=torch.bool)
    if model.config.no_ACT_continue:
        return outputs["q_halt_logits"] > 0
    return outputs["q_halt_logits"] > outputs["q_continue_logits"]


class DepthEvaluation:
    """Scores the predictions at each step budget under each halting rule (see the module docstring).

    Args:
        model: the model, in eval mode.
        depths: the step budgets, ascending.
        rules: halting rules from :data:`HALT_RULES`.
        make_evaluators: a fresh list of evaluators (one list per rule and budget).
    """

    def __init__(self, model: ACTModel, depths: Sequence[int], rules: Sequence[str], make_evaluators: Callable[[], list[Evaluator]]) -> None:
        self.model, self.depths, self.rules = model, sorted(depths), tuple(rules)
        self.evaluators = {(rule, depth): make_evaluators() for rule in self.rules for depth in self.depths}
        for evaluators in self.evaluators.values():
            for evaluator in evaluators:
                evaluator.begin_eval()
        self.steps = {key: 0.0 for key in self.evaluators}  # summed steps used, over real examples
        self.count = 0.0

    @torch.no_grad()
    def update_batch(self, batch: dict[str, Tensor]) -> None:
        """Run ``batch`` to the largest budget once, scoring every (rule, budget) on the way."""
        model = self.model
        carry = model.initial_carry(batch)
        real = (batch["example_index"] >= 0) & (batch["labels"] != IGNORE_LABEL_ID).any(-1)
        self.count += float(real.sum())
        halted_at = torch.full_like(real, self.depths[-1] + 1, dtype=torch.long)
        at_halt: dict[str, Tensor] = {}
        pending = list(self.depths)
        for step in range(1, self.depths[-1] + 1):
            carry, outputs = model(carry, batch)
            carry = replace(carry, halted=torch.zeros_like(carry.halted))  # go on past halt_max_steps
            current = {"preds": outputs["logits"].argmax(-1), "q_halt_logits": outputs["q_halt_logits"]}
            newly = halt_signal(model, outputs) & (halted_at > step)
            halted_at = torch.where(newly, step, halted_at)
            at_halt = {key: torch.where(_rows(newly, value), value, at_halt[key]) if at_halt else value for key, value in current.items()}
            if step != pending[0]:
                continue
            pending.pop(0)
            for rule in self.rules:
                stopped = halted_at <= step if rule == "q" else torch.zeros_like(real)
                chosen = {key: torch.where(_rows(stopped, value), at_halt[key], value) for key, value in current.items()}
                self.steps[(rule, step)] += float(torch.where(real, torch.clamp(halted_at, max=step) if rule == "q" else step, 0).sum())
                for evaluator in self.evaluators[(rule, step)]:
                    evaluator.update_batch(batch, chosen)

    def result(self, rank: int, world_size: int) -> dict[str, dict[int, dict[str, float]]]:
        """``{rule: {budget: {metric: value, "mean_steps": ...}}}`` on rank 0 (``{}`` elsewhere)."""
        keys = list(self.evaluators)
        sums = torch.tensor([self.count] + [self.steps[key] for key in keys], dtype=torch.float64)
        if world_size > 1:
            sums = sums.to(_collective_device())
            dist.all_reduce(sums)
        count, *steps = sums.tolist()
        out: dict[str, dict[int, dict[str, float]]] = {}
        for key, used in zip(keys, steps):
            metrics: dict[str, float] = {}
            for evaluator in self.evaluators[key]:
                metrics.update(evaluator.result(None, rank, world_size) or {})
            rule, depth = key
            out.setdefault(rule, {})[depth] = {**metrics, "mean_steps": used / max(count, 1.0)}
        return out if rank == 0 else {}


def _rows(mask: Tensor, like: Tensor) -> Tensor:
    return mask.view((-1,) + (1,) * (like.ndim - 1))


def _collective_device() -> torch.device | None:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
