"""Adaptive computation time (ACT) around a recursive reasoning core.

One call of :class:`ACTModel` is one *supervision step*: every sample of the carried batch runs one
full recursion (``H_cycles`` x ``L_cycles`` for the TRM) starting from its carried latent state, and
the Q-head decides which samples halt. Halted samples are replaced by fresh samples of the next batch
at the following call, so the batch always stays full (deep supervision with a carry).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.layers import CastedEmbedding, CastedLinear, RotaryEmbedding, trunc_normal_
from models.recursive_reasoning.config import ArchConfig
from models.sparse_embedding import SparsePuzzleEmbedding


@dataclass
class LatentState:
    """The recursion's latent state: the answer ``z_H`` (TRM's y) and the reasoning latent ``z_L`` (z)."""

    z_H: Tensor
    z_L: Tensor

    def detach(self) -> LatentState:
        return LatentState(self.z_H.detach(), self.z_L.detach())


@dataclass
class ACTCarry:
    """What persists between supervision steps."""

    latent: LatentState
    steps: Tensor  # [B] int32: supervision steps taken by each sample
    halted: Tensor  # [B] bool: the sample is done and will be replaced at the next call
    data: dict[str, Tensor]  # the samples currently being worked on
    prev_logits: Tensor | None = None  # previous step's logits, for jd.differential_loss
    prev_logits_across_samples: bool = False  # a new sample starts from the replaced sample's logits (the JD study)


@dataclass
class CoreOutput:
    latent: LatentState
    logits: Tensor  # [B, S, V] float32
    q_halt_logits: Tensor  # [B] float32
    q_continue_logits: Tensor  # [B] float32
    cycle_logits: list[Tensor] | None = None  # per H-cycle logits when asked


class RecursiveCore(nn.Module):
    """The part of a model that runs under ``torch.compile``: recursion, LM head and Q-head.

    Subclasses implement :meth:`recurse`. ``hidden`` tensors are ``[B, P + S, D]`` where the first
    ``P = puzzle_emb_len`` positions hold the puzzle embedding.
    """

    def __init__(self, config: ArchConfig, seq_len: int, vocab_size: int) -> None:
        super().__init__()
        self.config = config
        self.puzzle_emb_len = config.effective_puzzle_emb_len
        self.lm_head = CastedLinear(config.hidden_size, vocab_size)
        self.q_head: CastedLinear | None = None  # arch.no_act (the JD study's trmjd): no Q-head at all
        if not config.no_act:
            self.q_head = CastedLinear(config.hidden_size, 2, bias=True)
            with torch.no_grad():  # start with "never halt" so early training explores all steps
                self.q_head.weight.zero_()
                assert self.q_head.bias is not None
                self.q_head.bias.fill_(-5.0)
        full_len = seq_len + self.puzzle_emb_len
        self.rotary = RotaryEmbedding(config.hidden_size // config.num_heads, full_len, config.rope_theta) if config.pos_encodings == "rope" else None

    def rope(self) -> tuple[Tensor, Tensor] | None:
        return None if self.rotary is None else self.rotary()

    def recurse(self, latent: LatentState, inputs: Tensor, keep_cycle_states: bool) -> tuple[LatentState, list[Tensor]]:
        """Run one supervision step's recursion; return the new latent and (optionally) every H-cycle's ``z_H``."""
        raise NotImplementedError

    def forward(self, latent: LatentState, inputs: Tensor, keep_cycle_logits: bool = False) -> CoreOutput:
        latent, cycle_states = self.recurse(latent, inputs, keep_cycle_logits)
        logits = self.lm_head(latent.z_H)[:, self.puzzle_emb_len :].float()
        if self.q_head is None:  # no_act: constant logits that never halt and carry no gradient
            q_logits = torch.full((logits.shape[0], 2), -5.0, device=logits.device)
        else:
            q_logits = self.q_head(latent.z_H[:, 0]).float()
        cycle_logits = None
        if keep_cycle_logits:
            cycle_logits = [self.lm_head(z)[:, self.puzzle_emb_len :].float() for z in cycle_states[:-1]] + [logits]
        return CoreOutput(latent.detach(), logits, q_logits[..., 0], q_logits[..., 1], cycle_logits)


class ACTModel(nn.Module):
    """Input embeddings + a :class:`RecursiveCore` + ACT halting with a carry.

    Args:
        config: architecture hyper-parameters.
        core: the recursion (TRM, HRM or a plain transformer).
        seq_len, vocab_size, num_puzzle_identifiers: from the dataset's metadata.
    """

    H_init: Tensor  # buffers: the latents a fresh sample starts from
    L_init: Tensor

    def __init__(self, config: ArchConfig, core: RecursiveCore, seq_len: int, vocab_size: int, num_puzzle_identifiers: int) -> None:
        super().__init__()
        self.config = config
        self.core = core
        self.seq_len = seq_len
        self.vocab_size = vocab_size
        self.forward_dtype = _resolve_dtype(config.forward_dtype)
        hidden = config.hidden_size
        self.embed_scale = math.sqrt(hidden)
        embed_init_std = 1.0 / self.embed_scale
        self.puzzle_emb_len = config.effective_puzzle_emb_len
        self.embed_tokens = CastedEmbedding(vocab_size, hidden, init_std=embed_init_std, cast_to=self.forward_dtype)
        self.puzzle_embedding = (
            SparsePuzzleEmbedding(num_puzzle_identifiers, config.puzzle_emb_ndim, cast_to=self.forward_dtype) if config.puzzle_emb_ndim > 0 else None
        )
        self.embed_pos = (
            CastedEmbedding(seq_len + self.puzzle_emb_len, hidden, init_std=embed_init_std, cast_to=self.forward_dtype)
            if config.pos_encodings == "learned"
            else None
        )
        self.register_buffer("H_init", trunc_normal_(torch.empty(hidden), std=1.0), persistent=True)
        self.register_buffer("L_init", trunc_normal_(torch.empty(hidden), std=1.0), persistent=True)

    # ----------------------------------------------------------------------------------- carry
    def initial_carry(self, batch: dict[str, Tensor]) -> ACTCarry:
        """A carry in which every sample is halted, so the first call loads the whole batch."""
        batch_size = batch["inputs"].shape[0]
        device = batch["inputs"].device
        shape = (batch_size, self.seq_len + self.puzzle_emb_len, self.config.hidden_size)
        empty = torch.zeros(shape, dtype=self.forward_dtype, device=device)
        return ACTCarry(
            latent=LatentState(empty, empty.clone()),
            steps=torch.zeros(batch_size, dtype=torch.int32, device=device),
            halted=torch.ones(batch_size, dtype=torch.bool, device=device),
            data={key: torch.empty_like(value) for key, value in batch.items()},
        )

    def _reset_latent(self, halted: Tensor, latent: LatentState) -> LatentState:
        mask = halted.view(-1, 1, 1)
        return LatentState(
            torch.where(mask, self.H_init.to(latent.z_H.dtype), latent.z_H),
            torch.where(mask, self.L_init.to(latent.z_L.dtype), latent.z_L),
        )

    # ------------------------------------------------------------------------------ embedding
    def input_embeddings(self, inputs: Tensor, puzzle_identifiers: Tensor) -> Tensor:
        embedding = self.embed_tokens(inputs.long())
        if self.puzzle_embedding is not None:
            puzzle = self.puzzle_embedding(puzzle_identifiers.long())
            pad = self.puzzle_emb_len * self.config.hidden_size - puzzle.shape[-1]
            if pad > 0:
                puzzle = F.pad(puzzle, (0, pad))
            embedding = torch.cat((puzzle.view(-1, self.puzzle_emb_len, self.config.hidden_size), embedding), dim=-2)
        if self.embed_pos is not None:
            embedding = 0.707106781 * (embedding + self.embed_pos.table())
        return self.embed_scale * embedding

    # -------------------------------------------------------------------------------- forward
    def forward(
        self,
        carry: ACTCarry,
        batch: dict[str, Tensor],
        *,
        keep_cycle_logits: bool = False,
        carry_noise: float = 0.0,
    ) -> tuple[ACTCarry, dict[str, Tensor | list[Tensor]]]:
        """One supervision step. Returns the new carry and the outputs of this step.

        Outputs: ``logits`` ``[B, S, V]``, ``q_halt_logits`` / ``q_continue_logits`` ``[B]``,
        ``target_q_continue`` ``[B]`` (training with Q-continue only), ``cycle_logits`` (when asked).
        """
        latent, steps, data, prev_logits = self._carried_in(carry, batch, carry_noise)
        inputs = self.input_embeddings(data["inputs"], data["puzzle_identifiers"])
        out = self.core(latent, inputs, keep_cycle_logits)
        outputs: dict[str, Tensor | list[Tensor]] = {
            "logits": out.logits,
            "q_halt_logits": out.q_halt_logits,
            "q_continue_logits": out.q_continue_logits,
        }
        if out.cycle_logits is not None:
            outputs["cycle_logits"] = out.cycle_logits
        if prev_logits is not None:
            outputs["prev_logits"] = prev_logits
        with torch.no_grad():
            steps = steps + 1
            new_halted = self._halted_after(out, steps, inputs, outputs)
        new_prev = out.logits.detach() if carry.prev_logits is not None else None
        return ACTCarry(out.latent, steps, new_halted, data, new_prev, carry.prev_logits_across_samples), outputs

    def _carried_in(
        self, carry: ACTCarry, batch: dict[str, Tensor], carry_noise: float
    ) -> tuple[LatentState, Tensor, dict[str, Tensor], Tensor | None]:
        """The step's start: halted samples replaced by the batch's (fresh latents, zero steps), carried
        ones kept (with ``carry_noise`` on their latents when training)."""
        halted = carry.halted
        latent = self._reset_latent(halted, carry.latent)
        if carry_noise > 0 and self.training:
            keep = ~halted.view(-1, 1, 1)  # perturb only carried-over samples between refinement steps
            latent = LatentState(
                latent.z_H + keep * carry_noise * torch.randn_like(latent.z_H),
                latent.z_L + keep * carry_noise * torch.randn_like(latent.z_L),
            )
        steps = torch.where(halted, torch.zeros_like(carry.steps), carry.steps)
        data = {key: torch.where(halted.view((-1,) + (1,) * (value.ndim - 1)), batch[key], value) for key, value in carry.data.items()}
        prev_logits = carry.prev_logits
        if prev_logits is not None and not carry.prev_logits_across_samples:
            prev_logits = torch.where(halted.view(-1, 1, 1), torch.zeros_like(prev_logits), prev_logits)
        return latent, steps, data, prev_logits

    def _halted_after(self, out: CoreOutput, steps: Tensor, inputs: Tensor, outputs: dict[str, Tensor | list[Tensor]]) -> Tensor:
        """Which samples halt after this step: at the step budget, or (training with ACT) when the Q-head says
        so after an exploration minimum; adds Q-continue's bootstrapped target to ``outputs``."""
        is_last_step = steps >= self.config.halt_max_steps
        new_halted = is_last_step
        if not (self.training and self.config.halt_max_steps > 1 and not self.config.no_act):
            return new_halted
        if self.config.no_ACT_continue:
            new_halted = new_halted | (out.q_halt_logits > 0)
        else:
            new_halted = new_halted | (out.q_halt_logits > out.q_continue_logits)
        # Exploration: with some probability a sample must run at least a random number of steps.
        explore = torch.rand_like(out.q_halt_logits) < self.config.halt_exploration_prob
        min_steps = explore * torch.randint_like(steps, low=2, high=self.config.halt_max_steps + 1)
        new_halted = new_halted & (steps >= min_steps)
        if not self.config.no_ACT_continue:
            # Bootstrapped target for Q-continue: the value of the next step from the new state.
            following = self.core(out.latent, inputs.detach())
            next_value = torch.where(is_last_step, following.q_halt_logits, torch.maximum(following.q_halt_logits, following.q_continue_logits))
            outputs["target_q_continue"] = torch.sigmoid(next_value)
        return new_halted

    def enable_differential_loss(self, carry: ACTCarry, across_samples: bool = False) -> ACTCarry:
        """Make the carry keep the previous step's logits (for ``jd.differential_loss``). A new sample's
        first step subtracts zeros, or with ``across_samples`` (the JD study) the final logits of the
        sample it replaced."""
        batch_size = carry.steps.shape[0]
        prev = torch.zeros(batch_size, self.seq_len, self.vocab_size, device=carry.steps.device)
        return replace(carry, prev_logits=prev, prev_logits_across_samples=across_samples)


def perturb_latent(carry: ACTCarry, rate: float) -> ACTCarry:
    """The JD study's carry perturbation: Gaussian noise of scale ``rate`` on every sample's ``z_H`` and
    ``z_L`` (drawn in that order), applied after each supervision step of a stack."""
    latent = carry.latent
    noisy = LatentState(latent.z_H + torch.randn_like(latent.z_H) * rate, latent.z_L + torch.randn_like(latent.z_L) * rate)
    return replace(carry, latent=noisy)


def _resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
