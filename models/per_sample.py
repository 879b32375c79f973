"""Per-sample gradients in one backward pass, for instance-wise Jacobian descent.

Inside :func:`per_sample_parameters`, every :class:`~models.layers.CastedLinear` and
:class:`~models.layers.CastedEmbedding` of a model computes sample ``b``'s output with its own copy
of the weights: a leaf tensor ``[B, *weight.shape]`` that is a zero-copy broadcast view of the shared
weight. One backward pass of a loss whose ``b``-th term depends on sample ``b`` alone then leaves in
each leaf's ``.grad`` the ``B`` per-sample gradients — the rows of the IWRM Jacobian — for the
FLOPs of one ordinary backward (the weight gradient is computed per sample instead of summed).
Plain autograd does the work, so it also runs under ``torch.compile``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch  # noqa: F401 - the docstring example uses it
from torch import Tensor, nn

from models.layers import CastedEmbedding, CastedLinear


@contextlib.contextmanager
def per_sample_parameters(model: nn.Module, batch_size: int) -> Iterator[dict[nn.Parameter, Tensor]]:
    """Give each sample its own weights for the forwards run inside the context.

    Yields ``{parameter: leaf}``; after a backward, ``leaf.grad[b]`` is sample ``b``'s gradient of
    ``parameter``. Parameters of other module types (none in this project's models) are rejected.

    Example:
        >>> layer = CastedLinear(3, 2)
        >>> x = torch.randn(4, 3)
        >>> with per_sample_parameters(layer, batch_size=4) as leaves:
        ...     layer(x).pow(2).sum().backward()
        >>> per_sample = leaves[layer.weight].grad
        >>> torch.allclose(per_sample[1], torch.autograd.grad(layer(x[1:2]).pow(2).sum(), layer.weight)[0], atol=1e-6)
        True
    """
    leaves: dict[nn.Parameter, Tensor] = {}
    patched: list[CastedLinear | CastedEmbedding] = []
    covered: set[int] = set()
    try:
        for module in model.modules():
            if not isinstance(module, CastedLinear | CastedEmbedding):
                continue
            own: dict[str, Tensor] = {}
            for name, param in module.named_parameters(recurse=False):
                if param.requires_grad:
                    leaf = param.detach().unsqueeze(0).expand(batch_size, *param.shape).requires_grad_(True)
                    own[name] = leaf
                    leaves[param] = leaf
                    covered.add(id(param))
            if not own:
                continue  # frozen (freeze_weights): the module computes as usual
            if "weight" not in own:
                raise TypeError(f"per-sample gradients need {type(module).__name__}.weight trainable when its bias is")
            module.per_sample = own
            patched.append(module)
        uncovered = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in covered]
        if uncovered:
            raise TypeError(f"per-sample gradients support CastedLinear and CastedEmbedding only; not {uncovered[:4]}")
        yield leaves
    finally:
        for module in patched:
            module.per_sample = None
