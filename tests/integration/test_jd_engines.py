"""Every JD engine gives the gradient of the reference Jacobian path, on a tiny TRM with puzzle rows.

The integration tests; the others are in
tests/unit/test_jd_engines.py.
"""

from __future__ import annotations

import torch

from jd.config import JDConfig
from jd.step import build_jd_step
from models.losses import ACTLossHead
from models.per_sample import call_module
from models.registry import build_model
from tests.conftest import tiny_arch
from tests.unit.test_models import BATCH, PUZZLES, SEQ, VOCAB, make_batch


def test_engines_under_torch_compile_give_the_eager_gradients() -> None:
    """The compiled path (the default on CUDA; here CPU inductor): per-sample leaves through a compiled
    core, and Jacobian rows back-propagated one at a time through a compiled backward."""
    from models.registry import compile_core

    def gradients(engine: str, compiled: bool, regional: bool = False) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = build_model(
            tiny_arch(halt_exploration_prob=0.0), seq_len=SEQ, vocab_size=VOCAB, num_puzzle_identifiers=PUZZLES, device=torch.device("cpu")
        )
        if compiled:
            compile_core(model, repeated_backward=True, regional=regional)
        head = ACTLossHead(model)
        step = build_jd_step(JDConfig(split="iwrm_with_q_halt_in", engine=engine, parallel_chunk_size=1))
        params = [p for p in model.parameters() if p.requires_grad]
        batch = make_batch(seed=0)
        with step.forward_context(model, BATCH) as weights:
            _, terms, _, _, _ = call_module(head, weights, head.initial_carry(batch), batch, global_batch_size=BATCH)
            rows = [r for _, r in model.puzzle_embedding.pending_rows()]
            step.backward([terms], params, rows)
        return [p.grad.clone() for p in params] + [r.grad.clone() for r in rows]

    try:
        eager = gradients("per_sample", compiled=False)
        for engine, regional in (("per_sample", False), ("gramian", False), ("per_sample", True)):
            for a, b in zip(gradients(engine, compiled=True, regional=regional), eager):
                torch.testing.assert_close(a, b, rtol=2e-4, atol=1e-6)
    finally:
        torch._dynamo.reset()


def test_regional_compile_compiles_the_repeated_module_only() -> None:
    """``compile=regional``: every reasoning module is compiled (one graph for all its calls), the core is not."""
    from models.layers import ReasoningModule
    from models.registry import compile_core

    for arch in ("trm", "hrm"):
        model = build_model(
            tiny_arch(name=arch, H_layers=1 if arch == "hrm" else 0),
            seq_len=SEQ,
            vocab_size=VOCAB,
            num_puzzle_identifiers=PUZZLES,
            device=torch.device("cpu"),
        )
        compile_core(model, repeated_backward=False, regional=True)
        regions = [module for module in model.core.modules() if isinstance(module, ReasoningModule)]
        assert regions and all(module._compiled_call_impl is not None for module in regions)
        assert model.core._compiled_call_impl is None
