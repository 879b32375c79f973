"""A plain transformer baseline: the same blocks, no recursion (``H_cycles = L_cycles = 1``).

Each supervision step applies ``L_layers`` blocks once to ``z_H + x``; with ``halt_max_steps > 1``
the ACT wrapper still lets it refine its answer across supervision steps through the carry.
"""

from __future__ import annotations

from torch import Tensor

from models.layers import Block, ReasoningModule
from models.recursive_reasoning.act import LatentState, RecursiveCore
from models.recursive_reasoning.config import ArchConfig


class TransformerCore(RecursiveCore):
    def __init__(self, config: ArchConfig, seq_len: int, vocab_size: int) -> None:
        super().__init__(config, seq_len, vocab_size)
        full_len = seq_len + self.puzzle_emb_len
        self.layers = ReasoningModule(
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

    def recurse(self, latent: LatentState, inputs: Tensor, keep_cycle_states: bool) -> tuple[LatentState, list[Tensor]]:
        z_H = self.layers(latent.z_H, inputs, self.rope())
        return LatentState(z_H, latent.z_L), [z_H]
