"""Per-sample gradients in one backward pass, for instance-wise Jacobian descent.

:func:`per_sample_weights` makes, for every trainable parameter of a model's
:class:`~models.layers.CastedLinear` and :class:`~models.layers.CastedEmbedding` layers, a leaf tensor
``[B, *weight.shape]`` that is a zero-copy broadcast view of the shared weight. Calling the model with
them (:meth:`PerSampleWeights.call`, which passes them explicitly through ``torch.func.functional_call``)
computes sample ``b``'s output with its own copy of the weights: the layers see a weight with a leading
batch dimension and take their per-sample path. One backward pass of a loss whose ``b``-th term depends
on sample ``b`` alone then gives the ``B`` per-sample gradients — the rows of the IWRM Jacobian — for
the FLOPs of one ordinary backward (the weight gradient is computed per sample instead of summed);
:meth:`PerSampleWeights.gradients` collects them. The module itself is never modified.

Inside a compiled graph autograd does all the work (it returns each leaf's per-sample gradient; the
graph plans its own buffers). Elsewhere a linear layer's per-sample gradient skips autograd's return
path: each call adds its share into the weight's :class:`~models.layers.InPlaceSum`. The recursion calls
every layer several times, and a ``[B, out, in]`` tensor per call, summed by autograd, cost more than
the matmuls themselves (``docs/performance.md``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from models.layers import CastedEmbedding, CastedLinear, InPlaceSum


@dataclass
class PerSampleWeights:
    """Per-sample weight leaves of ``owner``'s parameters.

    Attributes:
        owner: the module they were made for.
        by_name: ``{name in owner: leaf [B, *shape]}``, what the call passes.
        by_parameter: ``{shared parameter: leaf}``; after a backward, :meth:`gradients` gives sample ``b``'s
            gradient at index ``b``.
        in_place: ``{shared parameter: its in-place sum}`` for the linear weights summed in place (see the module docstring).

    Example:
        >>> layer = CastedLinear(3, 2)
        >>> x = torch.randn(4, 3)
        >>> weights = per_sample_weights(layer, batch_size=4)
        >>> leaf = weights.by_parameter[layer.weight]
        >>> loss = weights.call(layer, x).pow(2).sum()
        >>> [per_sample] = weights.gradients([layer.weight], torch.autograd.grad(loss, [leaf], allow_unused=True))
        >>> torch.allclose(per_sample[1], torch.autograd.grad(layer(x[1:2]).pow(2).sum(), layer.weight)[0], atol=1e-6)
        True
    """

    owner: nn.Module
    by_name: dict[str, Tensor]
    by_parameter: dict[nn.Parameter, Tensor]
    in_place: dict[nn.Parameter, InPlaceSum]

    def call(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        """``module(*args, **kwargs)`` computed with these weights; ``module`` is the owner or holds it as a submodule."""
        return torch.func.functional_call(module, self._named_for(module), args, kwargs)

    def _named_for(self, module: nn.Module) -> dict[str, Tensor]:
        if module is self.owner:
            return self.by_name
        for prefix, child in module.named_modules():
            if child is self.owner:
                return {f"{prefix}.{name}": leaf for name, leaf in self.by_name.items()}
        raise ValueError(f"{type(module).__name__} does not hold the module these per-sample weights were made for")

    def gradients(self, params: list[nn.Parameter], from_autograd: Sequence[Tensor | None]) -> list[Tensor]:
        """Each parameter's per-sample gradient ``[B, *shape]`` from the backward just run: what autograd returned
        for its leaf (``from_autograd``, ``None`` when unused, as ``allow_unused=True`` gives) plus its in-place
        sum; zeros when neither holds one. Takes the sums, so that the next backward starts from zero."""
        result = []
        for param, grad in zip(params, from_autograd, strict=True):
            summed = self.in_place[param].take() if param in self.in_place else None
            if summed is not None:
                grad = summed if grad is None else summed + grad
            result.append(torch.zeros_like(self.by_parameter[param]) if grad is None else grad)
        return result


def per_sample_weights(
    model: nn.Module, batch_size: int, in_place: bool = True, reuse: dict[nn.Parameter, InPlaceSum] | None = None
) -> PerSampleWeights:
    """Per-sample leaves for every trainable parameter of ``model`` (all must belong to ``CastedLinear`` or
    ``CastedEmbedding`` layers; frozen ones keep computing as usual).

    ``in_place``: linear weights sum their per-sample gradients in place outside compiled graphs (see the
    module docstring; ``False``: autograd returns them everywhere). ``reuse``: the caller's sums from an
    earlier call (filled here), restarted so that their buffers serve again: the gradients they gave
    before are overwritten by the next backward."""
    by_name: dict[str, Tensor] = {}
    by_parameter: dict[nn.Parameter, Tensor] = {}
    sums: dict[nn.Parameter, InPlaceSum] = {}
    kept = {} if reuse is None else reuse
    for prefix, module in model.named_modules():
        if not isinstance(module, CastedLinear | CastedEmbedding):
            continue
        trainable = {name: param for name, param in module.named_parameters(recurse=False) if param.requires_grad}
        if trainable and "weight" not in trainable:
            raise TypeError(f"per-sample gradients need {type(module).__name__}.weight trainable when its bias is")
        for name, param in trainable.items():
            leaf = param.detach().unsqueeze(0).expand(batch_size, *param.shape).requires_grad_(True)
            if in_place and isinstance(module, CastedLinear) and name == "weight":
                sums[param] = kept.setdefault(param, InPlaceSum())
                sums[param].restart()
                leaf.per_sample_sum = sums[param]  # type: ignore[attr-defined]  # read by the layer's forward
            by_name[f"{prefix}.{name}" if prefix else name] = leaf
            by_parameter[param] = leaf
    covered = {id(param) for param in by_parameter}
    uncovered = [name for name, param in model.named_parameters() if param.requires_grad and id(param) not in covered]
    if uncovered:
        raise TypeError(f"per-sample gradients support CastedLinear and CastedEmbedding only; not {uncovered[:4]}")
    return PerSampleWeights(model, by_name, by_parameter, sums)


def call_module(module: nn.Module, weights: PerSampleWeights | None, *args: Any, **kwargs: Any) -> Any:
    """``module(*args, **kwargs)``, with ``weights`` when given (per-sample mode), else with its own parameters."""
    return module(*args, **kwargs) if weights is None else weights.call(module, *args, **kwargs)
