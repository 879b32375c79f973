"""The unreduced losses a loss head returns, from which every JD split builds its objectives."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

IGNORE_LABEL_ID = -100
"""Label value that takes no part in the loss (padding and cells that carry no answer)."""

Q_LOSS_WEIGHT = 0.5
"""Weight of the halting losses in the usual scalar loss: ``lm + 0.5 * (q_halt + q_continue)``."""


@dataclass
class LossTerms:
    """Unreduced losses of one ACT supervision step on one rank's batch.

    Every term is already divided by ``global_batch_size`` (the batch summed over all ranks and
    gradient-accumulation micro-batches), so that :meth:`total` summed over ranks and micro-batches
    is exactly the scalar loss that gradient descent minimises.

    Attributes:
        lm: ``[B, S]`` per-token language-model loss, each sample's row divided by its number of
            valid (non-ignored) tokens, zero on ignored tokens.
        q_halt: ``[B]`` binary cross-entropy of the halting head against "the answer is exact".
        q_continue: ``[B]`` bootstrapped Q-continue loss, or ``None`` when ``no_ACT_continue``.
        internal_lm: per H-cycle ``[B, S]`` LM losses (same scaling as ``lm``), present only when
            the model was asked to keep one graph per H-cycle (internal-cycle splits). The last
            entry is computed from the same logits as ``lm``.
        internal_differential: per H-cycle ``[B, S]`` differential losses, the JD study's ``d_i``:
            the loss of ``logits_i - logits_{i-1}.detach()`` (``logits_{-1} = 0``), per token, divided
            by ``global_batch_size`` but NOT by the sample's token count; present only when asked.
    """

    lm: Tensor
    q_halt: Tensor
    q_continue: Tensor | None = None
    internal_lm: list[Tensor] | None = None
    internal_differential: list[Tensor] | None = None

    @property
    def batch_size(self) -> int:
        return self.lm.shape[0]

    def halting(self) -> Tensor:
        """Per-sample weighted halting loss ``0.5 * (q_halt + q_continue)``, shape ``[B]``."""
        halting = self.q_halt
        if self.q_continue is not None:
            halting = halting + self.q_continue
        return Q_LOSS_WEIGHT * halting

    def per_sample(self) -> Tensor:
        """Per-sample scalar loss ``[B]``: the sample's LM loss plus its weighted halting loss."""
        return self.lm.sum(dim=-1) + self.halting()

    def total(self) -> Tensor:
        """The gradient-descent loss of this batch (a scalar)."""
        return self.per_sample().sum()

    def detach(self) -> LossTerms:
        return LossTerms(
            lm=self.lm.detach(),
            q_halt=self.q_halt.detach(),
            q_continue=None if self.q_continue is None else self.q_continue.detach(),
            internal_lm=None if self.internal_lm is None else [t.detach() for t in self.internal_lm],
            internal_differential=None if self.internal_differential is None else [t.detach() for t in self.internal_differential],
        )
