"""Building blocks shared by the TRM, HRM and transformer baselines.

Weights are stored in float32 and cast to the forward dtype (bfloat16 on CUDA, float32 on CPU) at use,
as in the reference code; norms are computed in float32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def trunc_normal_(tensor: Tensor, std: float = 1.0) -> Tensor:
    """Truncated normal initialisation (at two standard deviations) whose *actual* std is ``std``."""
    if std == 0:
        return tensor.zero_()
    # The std of a standard normal truncated to [-2, 2] is ~0.8796; rescale so the result has `std`.
    return nn.init.trunc_normal_(tensor, mean=0.0, std=std / 0.87962566103423978, a=-2 * std / 0.8796, b=2 * std / 0.8796)


def rms_norm(hidden: Tensor, eps: float = 1e-5) -> Tensor:
    """Weightless RMS normalisation over the last dimension, computed in float32."""
    dtype = hidden.dtype
    hidden = hidden.float()
    hidden = hidden * torch.rsqrt(hidden.square().mean(-1, keepdim=True) + eps)
    return hidden.to(dtype)


class CastedLinear(nn.Module):
    """A linear layer whose float32 weights are cast to the input's dtype at each call."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(trunc_normal_(torch.empty(out_features, in_features), std=1.0 / math.sqrt(in_features)))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        if self.weight.dim() == 3:  # per-sample weights [B, out, in] (models.per_sample)
            return _per_sample_linear(x, self.weight, self.bias)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


def _per_sample_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``x [B, ..., in]`` through a linear layer whose weight leaf ``[B, out, in]`` (and bias ``[B, out]``)
    broadcasts one shared weight: the forward is an ordinary matmul, the backward gives per-sample grads."""
    if not (torch.is_grad_enabled() and weight.requires_grad):  # the recursion's no-grad cycles: one shared matmul
        shared_bias = None if bias is None else (bias[0] if bias.dim() == 2 else bias).to(x.dtype)
        return F.linear(x, weight[0].to(x.dtype), shared_bias)
    batch = x.shape[0]
    flat = x.reshape(batch, -1, x.shape[-1])
    # Inside a compiled graph autograd returns the per-sample gradient: the graph plans its own buffers.
    in_place = None if torch.compiler.is_compiling() else getattr(weight, "per_sample_sum", None)
    out = _PerSampleLinear.apply(flat, weight, in_place)
    if bias is not None:  # per-sample [B, out], or shared [out] when it is frozen
        out = out + (bias.to(x.dtype).unsqueeze(1) if bias.dim() == 2 else bias.to(x.dtype))
    return out.reshape(*x.shape[:-1], weight.shape[1])


class InPlaceSum:
    """A weight's per-sample gradient ``[B, out, in]``, summed in place over the weight's uses in one backward.

    The recursion calls every layer several times; returned to autograd, each call's per-sample gradient
    would be a fresh ``[B, out, in]`` tensor added to the last. Summed here (``baddbmm_``) they cost
    the matmuls alone. :class:`models.per_sample.PerSampleWeights` attaches one to each linear weight
    leaf it makes and takes the sum after the backward; calls inside a compiled graph leave it out (the
    graph plans its own buffers).

    The sums are written into buffers kept for the next forward (:meth:`restart`): the CPU allocator gives
    a freed block of this size back to the system, and a fresh one costs page faults at every step.
    """

    def __init__(self) -> None:
        self.total: Tensor | None = None
        self._buffers: list[Tensor] = []  # the sums taken since the last restart, in order: the next forward's buffers
        self._taken = 0

    def restart(self) -> None:
        """A new forward: the sums taken before may be overwritten from now on."""
        self.total, self._taken = None, 0

    def add(self, grad_out: Tensor, x: Tensor) -> None:
        """Add ``grad_out[b]^T x[b]`` for every sample ``b`` (float32 sums of lower-precision products)."""
        product = grad_out.transpose(1, 2)
        if self.total is None:
            spare = self._buffers[self._taken] if self._taken < len(self._buffers) else None
            fits = spare is not None and spare.shape == (x.shape[0], product.shape[1], x.shape[2]) and spare.dtype == x.dtype == product.dtype
            self.total = torch.bmm(product, x, out=spare) if fits else torch.bmm(product, x).float()
        elif product.dtype == self.total.dtype:
            self.total.baddbmm_(product, x)
        else:
            self.total.add_(torch.bmm(product, x))

    def take(self) -> Tensor | None:
        """The sum since the last ``take`` (``None``: the weight was not used), and start a new one. It stays
        valid until :meth:`restart`."""
        total, self.total = self.total, None
        if total is not None:
            self._buffers[self._taken : self._taken + 1] = [total]
            self._taken += 1
        return total


class _PerSampleLinear(torch.autograd.Function):
    """``y_b = x_b W^T`` with ``W`` shared in value; ``dW`` is per sample: ``dW_b = dy_b^T x_b``, returned to
    autograd, or added to the weight's :class:`InPlaceSum` when it has one.

    The weight leaf is a stride-0 broadcast of one matrix, so the forward never copies it ``B`` times;
    the per-sample weight gradient costs the FLOPs of the usual (summed) one.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor, weight: Tensor, in_place: InPlaceSum | None) -> Tensor:
        # The forward takes ``ctx`` itself (no ``setup_context``): PyTorch 2.13's ``apply`` costs about 2.5x
        # less per call on this path, which the recursion pays for every linear layer at every step.
        ctx.save_for_backward(x, weight)
        ctx.in_place = in_place  # type: ignore[attr-defined]  # FunctionCtx takes attributes
        return F.linear(x, weight[0].to(x.dtype))

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x, weight = ctx.saved_tensors  # type: ignore[attr-defined]  # torch's FunctionCtx stub lacks what save_for_backward sets
        needs_x = ctx.needs_input_grad[0]  # type: ignore[attr-defined]  # set by autograd on the backward's ctx
        grad_x = grad_out @ weight[0].to(grad_out.dtype) if needs_x else None
        in_place: InPlaceSum | None = ctx.in_place  # type: ignore[attr-defined]  # set by forward
        if in_place is not None:
            in_place.add(grad_out, x)
            return grad_x, None, None
        return grad_x, torch.bmm(grad_out.transpose(1, 2), x).to(weight.dtype), None


class CastedEmbedding(nn.Module):
    """An embedding table whose float32 rows are cast to ``cast_to`` when looked up."""

    def __init__(self, num_embeddings: int, embedding_dim: int, init_std: float, cast_to: torch.dtype) -> None:
        super().__init__()
        self.cast_to = cast_to
        self.weight = nn.Parameter(trunc_normal_(torch.empty(num_embeddings, embedding_dim), std=init_std))

    def forward(self, ids: Tensor) -> Tensor:
        if self.weight.dim() == 3:  # per-sample tables [B, num_embeddings, dim] (models.per_sample)
            table = self.weight.to(self.cast_to)
            rows = torch.arange(ids.shape[0], device=ids.device).view(-1, *([1] * (ids.ndim - 1)))
            return table[rows, ids]
        return F.embedding(ids, self.weight.to(self.cast_to))

    def table(self) -> Tensor:
        """The whole table (``[B, N, D]`` per sample in per-sample mode), cast to the forward dtype."""
        return self.weight.to(self.cast_to)


class RotaryEmbedding(nn.Module):
    """Precomputed RoPE cos/sin tables for a fixed maximum sequence length."""

    cos: Tensor
    sin: Tensor

    def __init__(self, head_dim: int, max_positions: int, base: float = 10000.0) -> None:
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        angles = torch.cat((angles, angles), dim=-1)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self) -> tuple[Tensor, Tensor]:
        return self.cos, self.sin


def _rotate_half(x: Tensor) -> Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` of shape ``[B, S, heads, head_dim]`` by position."""
    dtype = x.dtype
    x = x.float()
    cos, sin = cos[: x.shape[1]].unsqueeze(-2), sin[: x.shape[1]].unsqueeze(-2)
    return (x * cos + _rotate_half(x) * sin).to(dtype)


class Attention(nn.Module):
    """Non-causal multi-head self-attention (puzzles are predicted all at once)."""

    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.qkv_proj = CastedLinear(hidden_size, 3 * hidden_size)
        self.o_proj = CastedLinear(hidden_size, hidden_size)

    def forward(self, hidden: Tensor, rotary: tuple[Tensor, Tensor] | None) -> Tensor:
        batch, seq, _ = hidden.shape
        qkv = self.qkv_proj(hidden).view(batch, seq, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.unbind(dim=2)
        if rotary is not None:
            query, key = apply_rotary(query, *rotary), apply_rotary(key, *rotary)
        out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


def _swiglu_inner(hidden_size: int, expansion: float) -> int:
    """The reference TRM's SwiGLU width: ``round(expansion * hidden * 2 / 3)`` rounded up to a multiple of 256.

    The rounding applies at every size (so a hidden-64 model's MLP is 256 wide, as in the reference),
    which is what lets reference checkpoints of any size load.

    Example:
        >>> _swiglu_inner(64, 4), _swiglu_inner(512, 4)
        (256, 1536)
    """
    inner = round(expansion * hidden_size * 2 / 3)
    return -(-inner // 256) * 256


class SwiGLU(nn.Module):
    """Gated feed-forward block: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, hidden_size: int, expansion: float) -> None:
        super().__init__()
        inner = _swiglu_inner(hidden_size, expansion)
        self.gate_up_proj = CastedLinear(hidden_size, 2 * inner)
        self.down_proj = CastedLinear(inner, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    """Post-norm block: ``h = norm(h + mix(h)); h = norm(h + mlp(h))``.

    ``mix`` is self-attention, or with ``mlp_t`` a SwiGLU applied along the sequence (token mixing
    with an MLP, as in the TRM paper's Sudoku variant), whose residual is normalised over the
    positions, as the reference does. Dropout (``p = dropout``) applies to each ``mix`` / ``mlp`` output
    before its residual (``block_output=False``) or once to the block's output (``block_output=True``, the
    JD study's ``trmjd``).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        expansion: float,
        seq_len: int,
        mlp_t: bool = False,
        dropout: float = 0.0,
        norm_eps: float = 1e-5,
        block_output_dropout: bool = False,
    ) -> None:
        super().__init__()
        self.uses_mlp_t = mlp_t
        self.norm_eps = norm_eps
        self.dropout = 0.0 if block_output_dropout else dropout
        self.output_dropout = dropout if block_output_dropout else 0.0
        if mlp_t:
            self.mlp_t = SwiGLU(seq_len, expansion)
        else:
            self.self_attn = Attention(hidden_size, num_heads)
        self.mlp = SwiGLU(hidden_size, expansion)

    def forward(self, hidden: Tensor, rotary: tuple[Tensor, Tensor] | None) -> Tensor:
        if self.uses_mlp_t:
            # As in the reference: mix along the sequence and normalise there too (over positions), then turn back.
            tokens = hidden.transpose(1, 2)
            tokens = rms_norm(tokens + F.dropout(self.mlp_t(tokens), self.dropout, self.training), self.norm_eps)
            hidden = tokens.transpose(1, 2)
        else:
            hidden = rms_norm(hidden + F.dropout(self.self_attn(hidden, rotary), self.dropout, self.training), self.norm_eps)
        hidden = rms_norm(hidden + F.dropout(self.mlp(hidden), self.dropout, self.training), self.norm_eps)
        if self.output_dropout:
            hidden = F.dropout(hidden, self.output_dropout, self.training)
        return hidden


class ReasoningModule(nn.Module):
    """A stack of blocks applied to ``hidden + injection``."""

    def __init__(self, blocks: list[Block]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(blocks)

    def forward(self, hidden: Tensor, injection: Tensor, rotary: tuple[Tensor, Tensor] | None) -> Tensor:
        hidden = hidden + injection
        for layer in self.layers:
            hidden = layer(hidden, rotary)
        return hidden
