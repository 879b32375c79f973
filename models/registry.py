"""Architectures by name: the only way a config chooses model code (no import strings)."""

from __future__ import annotations

import torch

from models.layers import Block, ReasoningModule
from models.recursive_reasoning.act import ACTModel, RecursiveCore
from models.recursive_reasoning.config import ArchConfig
from models.recursive_reasoning.hrm import HRMCore
from models.recursive_reasoning.trm import TRMCore
from models.transformer_baseline import TransformerCore

CORES: dict[str, type[RecursiveCore]] = {"trm": TRMCore, "hrm": HRMCore, "transformer": TransformerCore}


def build_model(config: ArchConfig, *, seq_len: int, vocab_size: int, num_puzzle_identifiers: int, device: torch.device) -> ACTModel:
    """Build the ACT model named by ``config.name`` for a dataset's sizes, on ``device``.

    ``forward_dtype=auto`` becomes bfloat16 on CUDA and float32 elsewhere.

    Example:
        >>> cfg = ArchConfig(hidden_size=32, num_heads=2, L_layers=1, H_cycles=2, L_cycles=1, puzzle_emb_ndim=32, puzzle_emb_len=1)
        >>> model = build_model(cfg, seq_len=16, vocab_size=11, num_puzzle_identifiers=1, device=torch.device("cpu"))
        >>> type(model.core).__name__
        'TRMCore'
    """
    if config.name not in CORES:
        raise ValueError(f"unknown arch {config.name!r}; accepted: {sorted(CORES)}")
    if config.forward_dtype == "auto":
        config = config.model_copy(update={"forward_dtype": "bfloat16" if device.type == "cuda" else "float32"})
    if config.puzzle_emb_ndim > config.effective_puzzle_emb_len * config.hidden_size:
        raise ValueError(
            f"arch.puzzle_emb_ndim={config.puzzle_emb_ndim} does not fit in puzzle_emb_len={config.puzzle_emb_len} "
            f"positions of hidden_size={config.hidden_size}"
        )
    core = CORES[config.name](config, seq_len, vocab_size)
    model = ACTModel(config, core, seq_len, vocab_size, num_puzzle_identifiers)
    return model.to(device)


def compile_core(model: ACTModel, *, repeated_backward: bool, regional: bool = False) -> None:
    """Compile the model's recursive core with ``torch.compile``, in place (state-dict keys unchanged).

    ``regional``: compile only the repeated region, each reasoning module (the stack of blocks the
    recursion calls ``H_cycles x (L_cycles + 1)`` times per supervision step; the blocks themselves for a
    core without one), so that one compiled graph serves every call, instead of the whole unrolled
    recursion; the code between the calls runs eagerly.
    ``repeated_backward``: Jacobian descent back-propagates one graph more than once (once per Jacobian
    row or loss channel), which AOTAutograd's donated buffers forbid, so they are switched off; this
    is a process-wide PyTorch setting.
    """
    if repeated_backward:
        import torch._functorch.config as functorch_config  # not loaded by `import torch`

        functorch_config.donated_buffer = False
    if not regional:
        model.core.compile()
        return
    regions: list[torch.nn.Module] = [module for module in model.core.modules() if isinstance(module, ReasoningModule)]
    for module in regions or [module for module in model.core.modules() if isinstance(module, Block)]:
        module.compile()
