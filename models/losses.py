"""Cross-entropies and the ACT loss head, which turns one supervision step into :class:`LossTerms`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.loss_terms import IGNORE_LABEL_ID, LossTerms
from models.recursive_reasoning.act import ACTCarry, ACTModel


def _stablemax_s(x: Tensor, epsilon: float = 1e-30) -> Tensor:
    return torch.where(x < 0, 1 / (1 - x + epsilon), x + 1)


def log_stablemax(x: Tensor, dim: int = -1) -> Tensor:
    """``log(s(x) / sum s(x))`` with ``s(x) = x + 1`` for ``x >= 0`` and ``1 / (1 - x)`` below: a
    softmax substitute whose "exponential" grows linearly, which keeps large logits stable."""
    s_x = _stablemax_s(x)
    return torch.log(s_x / s_x.sum(dim=dim, keepdim=True))


def stablemax_cross_entropy(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_LABEL_ID) -> Tensor:
    """Per-token stablemax cross-entropy ``[...]`` (float64 inside), zero where ``labels == ignore_index``.

    Example (``s = [3, 1/2, 1]``, so the loss is ``-log(3 / 4.5)``):
        >>> logits = torch.tensor([[[2.0, -1.0, 0.0]]])
        >>> round(stablemax_cross_entropy(logits, torch.tensor([[0]])).item(), 4)
        0.4055
    """
    logprobs = log_stablemax(logits.to(torch.float64), dim=-1)
    valid = labels != ignore_index
    safe_labels = torch.where(valid, labels, 0)
    picked = torch.gather(logprobs, index=safe_labels.long().unsqueeze(-1), dim=-1).squeeze(-1)
    return -torch.where(valid, picked, 0).to(logits.dtype)


def softmax_cross_entropy(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_LABEL_ID) -> Tensor:
    """Per-token softmax cross-entropy, zero where ``labels == ignore_index``."""
    flat = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.long().reshape(-1), ignore_index=ignore_index, reduction="none")
    return flat.view(labels.shape).to(logits.dtype)


LOSS_FUNCTIONS: dict[str, Callable[[Tensor, Tensor, int], Tensor]] = {
    "stablemax_cross_entropy": stablemax_cross_entropy,
    "softmax_cross_entropy": softmax_cross_entropy,
}


class ACTLossHead(nn.Module):
    """Runs one supervision step of an :class:`ACTModel` and returns its unreduced losses and metrics.

    The usual scalar loss, for gradient descent, is ``terms.total()``:
    ``sum_b [ sum_t CE_bt / n_b + 0.5 * (BCE(q_halt_b, exact_b) + BCE(q_continue_b, target_b)) ] / global_batch_size``
    where ``n_b`` is the number of scored tokens of sample ``b``.

    Metrics are sums over the samples that halted at this step (divide by ``count`` to average):
    ``count``, ``accuracy``, ``exact_accuracy``, ``q_halt_accuracy``, ``steps``, ``lm_loss``, ``q_halt_loss``.
    """

    def __init__(
        self, model: ACTModel, loss_type: str = "stablemax_cross_entropy", differential_loss: bool = False, differential_across_samples: bool = False
    ) -> None:
        super().__init__()
        if loss_type not in LOSS_FUNCTIONS:
            raise ValueError(f"unknown loss_type {loss_type!r}; accepted: {sorted(LOSS_FUNCTIONS)}")
        self.model = model
        self.loss_fn = LOSS_FUNCTIONS[loss_type]
        self.differential_loss = differential_loss
        self.differential_across_samples = differential_across_samples

    def _cycle_terms(
        self, outputs: dict[str, Any], lm: Tensor, lm_terms: Callable[[Tensor], Tensor], labels: Tensor, scale: float, differential_cycles: bool
    ) -> tuple[list[Tensor] | None, list[Tensor] | None]:
        """The per-H-cycle LM losses (the last is the step's ``lm``) and, when asked, their differential losses."""
        if "cycle_logits" not in outputs:
            return None, None
        cycle_logits: list[Tensor] = outputs["cycle_logits"]
        internal = [lm_terms(step) for step in cycle_logits[:-1]] + [lm]
        if not differential_cycles:
            return internal, None
        previous = [torch.zeros_like(cycle_logits[0])] + [c.detach() for c in cycle_logits[:-1]]
        return internal, [self.loss_fn(c - p, labels, IGNORE_LABEL_ID) * scale for c, p in zip(cycle_logits, previous)]

    def initial_carry(self, batch: dict[str, Tensor]) -> ACTCarry:
        carry = self.model.initial_carry(batch)
        return self.model.enable_differential_loss(carry, self.differential_across_samples) if self.differential_loss else carry

    def forward(
        self,
        carry: ACTCarry,
        batch: dict[str, Tensor],
        *,
        global_batch_size: int,
        keep_cycle_logits: bool = False,
        differential_cycles: bool = False,
        carry_noise: float = 0.0,
    ) -> tuple[ACTCarry, LossTerms, dict[str, Tensor], dict[str, Tensor], Tensor]:
        """One supervision step; the last value is a boolean tensor: every sample has halted.

        ``keep_cycle_logits``: one graph and LM loss per H-cycle (``LossTerms.internal_lm``);
        ``differential_cycles`` adds the cycles' differential losses (``LossTerms.internal_differential``).
        ``outputs`` gains ``preds`` and ``exact`` (``[B]``: every scored token right)."""
        carry, outputs = self.model(carry, batch, keep_cycle_logits=keep_cycle_logits, carry_noise=carry_noise)
        labels = carry.data["labels"]
        logits: Tensor = outputs["logits"]
        q_halt_logits: Tensor = outputs["q_halt_logits"]

        metrics, divisor = _step_metrics(carry, labels, logits, q_halt_logits, outputs)
        exact = outputs["exact"]
        scale = 1.0 / global_batch_size

        def lm_terms(step_logits: Tensor) -> Tensor:
            if self.differential_loss and "prev_logits" in outputs:
                step_logits = step_logits - outputs["prev_logits"]
            return self.loss_fn(step_logits, labels, IGNORE_LABEL_ID) / divisor * scale

        lm = lm_terms(logits)
        if self.model.config.no_act:  # the JD study's trmjd: no Q-head, no halting loss
            q_halt = torch.zeros_like(q_halt_logits)
        else:
            q_halt = F.binary_cross_entropy_with_logits(q_halt_logits, exact.to(q_halt_logits.dtype), reduction="none") * scale
        q_continue = None
        if "target_q_continue" in outputs:
            q_continue = F.binary_cross_entropy_with_logits(outputs["q_continue_logits"], outputs["target_q_continue"], reduction="none") * scale
        internal, differential = self._cycle_terms(outputs, lm, lm_terms, labels, scale, differential_cycles)
        terms = LossTerms(lm=lm, q_halt=q_halt, q_continue=q_continue, internal_lm=internal, internal_differential=differential)

        with torch.no_grad():
            metrics["lm_loss"] = lm.detach().sum() * global_batch_size
            metrics["q_halt_loss"] = q_halt.detach().sum() * global_batch_size
            if q_continue is not None:
                metrics["q_continue_loss"] = q_continue.detach().sum() * global_batch_size
        return carry, terms, metrics, outputs, carry.halted.all()


@torch.no_grad()
def _step_metrics(
    carry: ACTCarry, labels: Tensor, logits: Tensor, q_halt_logits: Tensor, outputs: dict[str, Any]
) -> tuple[dict[str, Tensor], Tensor]:
    """The step's summed metrics over the samples that halted with scored tokens, and each sample's loss
    divisor (its count of scored tokens); adds ``preds`` and ``exact`` to ``outputs``."""
    mask = labels != IGNORE_LABEL_ID
    counts = mask.sum(-1)
    divisor = counts.clamp_min(1).unsqueeze(-1)
    preds = logits.argmax(-1)
    correct = mask & (preds == labels)
    exact = correct.sum(-1) == counts
    valid = carry.halted & (counts > 0)
    metrics = {
        "count": valid.sum(),
        "accuracy": torch.where(valid, (correct.float() / divisor).sum(-1), 0).sum(),
        "exact_accuracy": (valid & exact).sum(),
        "q_halt_accuracy": (valid & ((q_halt_logits >= 0) == exact)).sum(),
        "steps": torch.where(valid, carry.steps, 0).sum(),
    }
    outputs["preds"] = preds
    outputs["exact"] = exact
    return metrics, divisor
