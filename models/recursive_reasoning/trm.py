"""Tiny Recursive Model (TRM): one small shared network, recursed.

Each supervision step runs ``H_cycles`` times: ``L_cycles`` updates of the reasoning latent
``z_L <- net(z_L, z_H + x)`` followed by one update of the answer ``z_H <- net(z_H, z_L)``. Only
the last H-cycle runs under gradient (the earlier ones refine the state for free), unless the
internal-cycle JD splits ask for one graph per cycle, each started from a detached state.
"""

from __future__ import annotations

import torch
from torch import Tensor

from models.layers import Block, ReasoningModule
from models.recursive_reasoning.act import LatentState, RecursiveCore
from models.recursive_reasoning.config import ArchConfig


class TRMCore(RecursiveCore):
    """The TRM recursion over one shared stack of ``L_layers`` blocks."""

    def __init__(self, config: ArchConfig, seq_len: int, vocab_size: int) -> None:
        super().__init__(config, seq_len, vocab_size)
        full_len = seq_len + self.puzzle_emb_len
        self.L_level = ReasoningModule(
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
                for _ in range(config.L_layers)
            ]
        )

    def _cycle(self, z_H: Tensor, z_L: Tensor, inputs: Tensor) -> tuple[Tensor, Tensor]:
        rope = self.rope()
        for _ in range(self.config.L_cycles):
            z_L = self.L_level(z_L, z_H + inputs, rope)
        z_H = self.L_level(z_H, z_L, rope)
        return z_H, z_L

    def recurse(self, latent: LatentState, inputs: Tensor, keep_cycle_states: bool) -> tuple[LatentState, list[Tensor]]:
        z_H, z_L = latent.z_H, latent.z_L
        if keep_cycle_states:
            states = []
            for _ in range(self.config.H_cycles):
                z_H, z_L = self._cycle(z_H.detach(), z_L.detach(), inputs)
                states.append(z_H)
            return LatentState(z_H, z_L), states
        with torch.no_grad():
            for _ in range(self.config.H_cycles - 1):
                z_H, z_L = self._cycle(z_H, z_L, inputs)
        z_H, z_L = self._cycle(z_H, z_L, inputs)
        return LatentState(z_H, z_L), [z_H]
