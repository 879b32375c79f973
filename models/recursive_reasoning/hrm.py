"""Hierarchical Reasoning Model (HRM) baseline: a fast low-level and a slow high-level module.

Per supervision step, the low-level module updates ``z_L <- L(z_L, z_H + x)`` ``L_cycles`` times per
high-level update ``z_H <- H(z_H, z_L)``, for ``H_cycles`` high-level updates; only the final
low- and high-level updates run under gradient (the one-step gradient approximation of HRM).
"""

from __future__ import annotations

import torch
from torch import Tensor

from models.layers import Block, ReasoningModule
from models.recursive_reasoning.act import LatentState, RecursiveCore
from models.recursive_reasoning.config import ArchConfig


class HRMCore(RecursiveCore):
    """Two stacks: ``H_layers`` blocks for the high level, ``L_layers`` for the low level."""

    def __init__(self, config: ArchConfig, seq_len: int, vocab_size: int) -> None:
        super().__init__(config, seq_len, vocab_size)
        full_len = seq_len + self.puzzle_emb_len

        def stack(layers: int) -> ReasoningModule:
            return ReasoningModule(
                [
                    Block(
                        config.hidden_size,
                        config.num_heads,
                        config.expansion,
                        full_len,
                        config.mlp_t,
                        config.dropout,
                        config.rms_norm_eps,
                        block_output_dropout=config.dropout_placement == "block_output",
                    )
                    for _ in range(layers)
                ]
            )

        self.H_level = stack(config.H_layers)
        self.L_level = stack(config.L_layers)

    def recurse(self, latent: LatentState, inputs: Tensor, keep_cycle_states: bool) -> tuple[LatentState, list[Tensor]]:
        rope = self.rope()
        z_H, z_L = latent.z_H, latent.z_L
        grad_allowed = torch.is_grad_enabled()
        states: list[Tensor] = []
        for h in range(self.config.H_cycles):
            with_grad = grad_allowed and (keep_cycle_states or h == self.config.H_cycles - 1)
            if keep_cycle_states:
                z_H, z_L = z_H.detach(), z_L.detach()
            with torch.no_grad():
                for _ in range(self.config.L_cycles - 1):
                    z_L = self.L_level(z_L, z_H + inputs, rope)
            with torch.set_grad_enabled(with_grad):
                z_L = self.L_level(z_L, z_H + inputs, rope)
                z_H = self.H_level(z_H, z_L, rope)
            states.append(z_H)
        return LatentState(z_H, z_L), states
