"""The ACT supervision loop: one function runs the supervision steps for training, FAMO's recompute and
the autogram probe, so the three can never drift apart.

A supervision step is one ACT step of the loss head (:class:`models.losses.ACTLossHead`) with what the
JD split needs (per-cycle logits, differential cycles) and the configured carry noise. A micro-batch
runs ``batches_per_step`` of them on consecutive batches with the ACT carry (the reference loop), or,
in the ``same_batch`` loop of the JD study's supervision stacks, up to ``halt_max_steps`` on one batch
from a fresh carry until every sample has halted. :class:`SupervisionLoop` also owns each micro-batch's
carry between optimizer steps, saved per rank in checkpoints.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from jd.config import JDConfig
from jd.splits import SplitSpec
from models.loss_terms import LossTerms
from models.losses import ACTLossHead
from models.per_sample import PerSampleWeights, call_module
from models.recursive_reasoning.act import ACTCarry, perturb_latent
from training.state import carry_from_dict, carry_is_finite, carry_to_dict, preserved_rng, restore_rng

Batch = dict[str, Tensor]
StepObserver = Callable[[Batch, ACTCarry, dict[str, Tensor], dict[str, Tensor]], None]
"""Called after every supervision step with ``(batch, carry, metrics, outputs)``."""


class SupervisionLoop:
    """Runs the supervision steps of a split and keeps each micro-batch's ACT carry.

    Args:
        loss_head: the model's loss head.
        split: the JD split (``jd.split=none``: GD's one step per batch with the carry).
        jd: the ``jd.*`` settings (carry perturbation).
        global_batch_size: the loss divisor of the reference code.
        grad_accum_steps: micro-batches per optimizer step (one carry each).
        halt_max_steps: the ACT step budget.
        agree_on_halting: ranks aggregate one Jacobian, so a ``same_batch`` loop stops only when every
            rank's samples have halted (the objectives' count must agree).
        carry_shape: ``(micro_batch, seq_len, latent_len, hidden_size)``: what a restored carry must fit.
        device: where restored carries go.
        is_main: this rank prints the notes.
    """

    def __init__(
        self,
        loss_head: ACTLossHead,
        split: SplitSpec,
        jd: JDConfig,
        *,
        global_batch_size: int,
        grad_accum_steps: int,
        halt_max_steps: int,
        agree_on_halting: bool,
        carry_shape: tuple[int, int, int, int],
        device: torch.device,
        is_main: bool = True,
    ) -> None:
        self.loss_head, self.split, self.jd = loss_head, split, jd
        self.global_batch_size = global_batch_size
        self.supervision_steps = split.supervision_steps(halt_max_steps)  # at most, in the same_batch loop
        self.batches_per_step = split.batches_per_step(halt_max_steps)
        self.agree_on_halting = agree_on_halting
        self.carry_shape, self.device, self.is_main = carry_shape, device, is_main
        self.carries: list[ACTCarry | None] = [None] * grad_accum_steps
        self.stack_noise = jd.carry_perturbation == "stack_steps" and split.is_supervision_stack

    def act_step(
        self, carry: ACTCarry, batch: Batch, global_batch_size: int, weights: PerSampleWeights | None = None
    ) -> tuple[ACTCarry, LossTerms, dict[str, Tensor], dict[str, Tensor]]:
        """One ACT step of the loss head with the split's needs and the ``carried_samples`` carry noise
        (computed with ``weights``, the per-sample engine's, when given)."""
        split, jd = self.split, self.jd
        carry, terms, metrics, outputs, _ = call_module(
            self.loss_head,
            weights,
            carry,
            batch,
            global_batch_size=global_batch_size,
            keep_cycle_logits=split.needs_cycle_logits,
            differential_cycles=split.needs_differential_cycles,
            carry_noise=jd.carry_perturbation_rate if jd.carry_perturbation == "carried_samples" else 0.0,
        )
        return carry, terms, metrics, outputs

    def run(
        self,
        carry: ACTCarry | None,
        batches: Sequence[Batch],
        *,
        global_batch_size: int | None = None,
        on_step: StepObserver | None = None,
        weights: PerSampleWeights | None = None,
    ) -> tuple[ACTCarry, list[LossTerms]]:
        """THE supervision loop: each of ``batches`` feeds one step from ``carry`` (``None``: a fresh one); in
        the ``same_batch`` loop the batch runs until every sample halted. Returns the carry and each step's terms.
        ``weights``: the per-sample engine's (:meth:`jd.step.JDStep.forward_context`)."""
        schedule = list(batches) * self.supervision_steps if self.split.same_batch_loop else list(batches)
        steps: list[LossTerms] = []
        for batch in schedule:
            if carry is None:
                carry = self.loss_head.initial_carry(batch)
            carry, terms, metrics, outputs = self.act_step(carry, batch, global_batch_size or self.global_batch_size, weights)
            if on_step is not None:
                on_step(batch, carry, metrics, outputs)
            steps.append(terms)
            halted = carry.halted
            carry = perturb_latent(carry, self.jd.carry_perturbation_rate) if self.stack_noise else carry
            if self.split.same_batch_loop and self._all_halted(halted):
                break
        assert carry is not None, "no batch to run"
        return carry, steps

    def train_micro_batch(
        self, micro: int, batches: Sequence[Batch], on_step: StepObserver, weights: PerSampleWeights | None = None
    ) -> list[LossTerms]:
        """Training's supervision steps for micro-batch ``micro`` (``batches`` already its rows, on the device),
        continuing its carry; in the ``same_batch`` loop a batch starts from a fresh carry (one whose samples
        all halted is kept: its logits seed the differential loss) and one that did not finish is dropped."""
        carry = self.carries[micro]
        if self.split.same_batch_loop and not (carry is not None and bool(carry.halted.all())):
            carry = None
        with self._shared_puzzle_rows():
            carry, steps = self.run(carry, batches, on_step=on_step, weights=weights)
        self.carries[micro] = None if self.split.same_batch_loop and not bool(carry.halted.all()) else carry
        return steps

    def recompute(self, batches: Sequence[Batch], carry: ACTCarry | None, rng: dict[str, Any]) -> list[LossTerms]:
        """FAMO: a step's objectives again after the update, from its carry, batches and random draws,
        without gradient and without moving the training trajectory."""
        with torch.no_grad(), preserved_rng():
            restore_rng(rng)
            return self.run(carry, batches)[1]

    def probe(self, sample: Batch) -> None:
        """One optimizer step's forwards on ``sample`` (checks such as the autogram engine's)."""
        self.run(None, [sample] * self.batches_per_step, global_batch_size=1)

    def _shared_puzzle_rows(self) -> contextlib.AbstractContextManager[Any]:
        embedding = self.loss_head.model.puzzle_embedding
        if embedding is None:
            return contextlib.nullcontext()
        return embedding.share_rows(self.jd.puzzle_rows == "shared_in_stack" and self.split.same_batch_loop)

    def _all_halted(self, halted: Tensor) -> bool:
        """Whether every sample has halted, agreed by all ranks when they aggregate one Jacobian."""
        done = halted.all().float().reshape(1)
        if self.agree_on_halting:
            dist.all_reduce(done, op=dist.ReduceOp.MIN)
        return bool(done.item())

    # ------------------------------------------------------------------------------- carries
    def drop_nonfinite(self) -> None:
        """Restart the carries that went non-finite (they would poison their samples' next steps)."""
        self.carries = [None if carry is None or not carry_is_finite(carry) else carry for carry in self.carries]

    def state_dict(self) -> list[dict[str, Any] | None]:
        return [None if carry is None else carry_to_dict(carry) for carry in self.carries]

    def load_state_dict(self, saved: list[dict[str, Any] | None]) -> None:
        """Restore the carries when they fit this batch layout; otherwise they start fresh (with a note)."""
        if len(saved) == len(self.carries) and all(c is None or self._fits(c) for c in saved):
            dtype = self.loss_head.model.forward_dtype
            self.carries = [None if c is None else carry_from_dict(c, self.device, latent_dtype=dtype) for c in saved]
        elif self.is_main:
            print(
                "note: the ACT carries of the checkpoint do not fit this batch layout (global_batch_size / grad_accum_steps "
                "changed?): they start fresh",
                flush=True,
            )

    def _fits(self, saved: dict[str, Any]) -> bool:
        micro_batch, seq_len, latent_len, hidden = self.carry_shape
        data = saved.get("data") or {}
        return (
            tuple(saved["z_H"].shape) == (micro_batch, latent_len, hidden)
            and tuple(saved["z_L"].shape) == (micro_batch, latent_len, hidden)
            and "inputs" in data
            and tuple(data["inputs"].shape) == (micro_batch, seq_len)
            and (saved.get("prev_logits") is not None) == self.loss_head.differential_loss
        )
