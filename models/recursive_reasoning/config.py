"""The ``arch.*`` section of the training configuration, shared by every architecture."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

ARCH_NAMES = ("trm", "hrm", "transformer")


class ArchConfig(BaseModel):
    """Architecture hyper-parameters, with the reference TRM's names and defaults."""

    model_config = ConfigDict(extra="forbid")

    name: Literal["trm", "hrm", "transformer"] = "trm"
    loss_type: Literal["stablemax_cross_entropy", "softmax_cross_entropy"] = "stablemax_cross_entropy"

    hidden_size: int = Field(default=512, ge=8)
    num_heads: int = Field(default=8, ge=1)
    expansion: float = Field(default=4.0, gt=0)
    L_layers: int = Field(default=2, ge=1)
    H_layers: int = Field(default=0, ge=0, description="HRM only: layers of the high-level module")
    H_cycles: int = Field(default=3, ge=1)
    L_cycles: int = Field(default=6, ge=1)

    pos_encodings: Literal["rope", "learned", "none"] = "rope"
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    mlp_t: bool = False
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    dropout_placement: Literal["sublayers", "block_output"] = Field(
        default="sublayers",
        description="sublayers: on each attention/MLP output before its residual; block_output: once on each block's output (the JD study's trmjd)",
    )

    puzzle_emb_ndim: int = Field(default=512, ge=0, description="0 disables the puzzle embedding")
    puzzle_emb_len: int = Field(default=16, ge=0, description="0: ceil(puzzle_emb_ndim / hidden_size)")

    halt_max_steps: int = Field(default=16, ge=1)
    halt_exploration_prob: float = Field(default=0.1, ge=0.0, le=1.0)
    no_ACT_continue: bool = True
    no_act: bool = Field(
        default=False,
        description="the JD study's trmjd: no Q-head, no halting loss, every sample runs halt_max_steps supervision steps",
    )

    forward_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"

    @model_validator(mode="after")
    def _check(self) -> ArchConfig:
        if not self.mlp_t and self.hidden_size % self.num_heads:
            raise ValueError(f"arch.hidden_size={self.hidden_size} must be divisible by arch.num_heads={self.num_heads}")
        if self.name == "hrm" and self.H_layers < 1:
            raise ValueError("arch=hrm needs arch.H_layers >= 1 (layers of the high-level module)")
        if self.mlp_t and self.pos_encodings == "rope":
            raise ValueError("arch.mlp_t=true mixes tokens with an MLP and takes no RoPE: set arch.pos_encodings=none or learned")
        if not self.mlp_t and (self.hidden_size // self.num_heads) % 2 and self.pos_encodings == "rope":
            raise ValueError("RoPE needs an even head dimension (hidden_size / num_heads)")
        return self

    @property
    def effective_puzzle_emb_len(self) -> int:
        if self.puzzle_emb_ndim == 0:
            return 0
        if self.puzzle_emb_len:
            return self.puzzle_emb_len
        return -(-self.puzzle_emb_ndim // self.hidden_size)
