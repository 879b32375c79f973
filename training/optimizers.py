"""The optimizers of one run: Adam-atan2 for the weights, sign-SGD for the sparse puzzle embedding.

``freeze_weights=true`` (the JD study's option for fine-tuning on new puzzles) trains the puzzle
embeddings only: no Adam state and no weight decay ever touches a weight (bit-identical after any number
of steps), while GD or any JD split still differentiates the batch's puzzle-embedding rows. With JD the
frozen weights stay in the Jacobian by default (``jd.frozen_weights=in_jacobian``, the study's): their
columns shape the Gramian and so the aggregation weights, and their gradients are then dropped. With
``left_out`` (and with GD, where it changes nothing) they get ``requires_grad=False`` and the puzzle rows
alone make the Jacobian.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from jd.update import all_finite
from models.optimizers import make_adam_atan2
from models.recursive_reasoning.act import ACTModel
from models.sparse_embedding import SignSGDSparseEmbedding


class RunOptimizers:
    """Owns both optimizers and sets their learning rates from the schedule.

    Args:
        model: the model (its weights are frozen here when ``freeze_weights``).
        lr, puzzle_emb_lr: base learning rates (scaled by :meth:`step`'s ``lr_scale``).
        betas, weight_decay, puzzle_emb_weight_decay: as in the config.
        world_size: ranks whose puzzle-row gradients the sign-SGD step gathers.
        freeze_weights: train only the puzzle embeddings.
        extra_params: a scalarizer's learned parameters (UW's log-variances, IMTL-L's scales): trained with
            the weights' learning rate and schedule by an Adam-atan2 of their own, without weight decay.

    Raises ``ValueError`` when ``freeze_weights`` leaves nothing to train (no puzzle embedding).
    """

    def __init__(
        self,
        model: ACTModel,
        *,
        lr: float,
        puzzle_emb_lr: float,
        betas: tuple[float, float],
        weight_decay: float,
        puzzle_emb_weight_decay: float,
        world_size: int,
        freeze_weights: bool = False,
        frozen_in_jacobian: bool = False,
        extra_params: list[Tensor] | None = None,
    ) -> None:
        self.frozen: list[Tensor] = []  # frozen weights kept in the Jacobian (their gradients are dropped)
        if freeze_weights:
            if model.puzzle_embedding is None:
                raise ValueError("freeze_weights=true trains the puzzle embeddings only, but arch.puzzle_emb_ndim=0 gives none")
            if frozen_in_jacobian:
                self.frozen = [p for p in model.parameters() if p.requires_grad]
            else:
                for parameter in model.parameters():
                    parameter.requires_grad_(False)
        self.lr, self.puzzle_emb_lr = lr, puzzle_emb_lr
        self.params: list[Tensor] = [p for p in model.parameters() if p.requires_grad and not freeze_weights]
        self.extra: list[Tensor] = list(extra_params or [])
        self.weights = make_adam_atan2(self.params, lr=lr, betas=betas, weight_decay=weight_decay) if self.params else None
        self.scalarizer = make_adam_atan2(self.extra, lr=lr, betas=betas, weight_decay=0.0) if self.extra else None
        self.sparse = (
            SignSGDSparseEmbedding([model.puzzle_embedding], lr=puzzle_emb_lr, weight_decay=puzzle_emb_weight_decay, world_size=world_size)
            if model.puzzle_embedding is not None
            else None
        )

    def step(self, lr_scale: float) -> None:
        """One update of everything that trains, at ``lr_scale`` times the base learning rates."""
        for optimizer, base in ((self.weights, self.lr), (self.scalarizer, self.lr), (self.sparse, self.puzzle_emb_lr)):
            if optimizer is not None:
                for group in optimizer.param_groups:
                    group["lr"] = base * lr_scale
                optimizer.step()

    @property
    def jacobian_params(self) -> list[Tensor]:
        """What the backward differentiates: the trained weights, and the frozen ones kept in the Jacobian."""
        return self.frozen + self.params

    def zero_grad(self) -> None:
        for optimizer in (self.weights, self.scalarizer):
            if optimizer is not None:
                optimizer.zero_grad(set_to_none=True)
        for parameter in self.frozen:
            parameter.grad = None

    def state_dict(self) -> dict[str, Any]:
        """``optimizer`` (empty when the weights are frozen) and ``sparse_optimizer``, the checkpoint's keys."""
        return {
            "optimizer": {} if self.weights is None else self.weights.state_dict(),
            "sparse_optimizer": None if self.sparse is None else self.sparse.state_dict(),
            "scalarizer_optimizer": None if self.scalarizer is None else self.scalarizer.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s keys; raises ``ValueError``/``KeyError``/``RuntimeError`` when they do not fit."""
        if self.weights is not None:
            self.weights.load_state_dict(state["optimizer"])
        elif state.get("optimizer"):
            raise ValueError("the checkpoint trained the weights; this run freezes them (freeze_weights=true): start it with init_from")
        if self.sparse is not None and state.get("sparse_optimizer"):
            self.sparse.load_state_dict(state["sparse_optimizer"])
        if self.scalarizer is not None and state.get("scalarizer_optimizer"):
            self.scalarizer.load_state_dict(state["scalarizer_optimizer"])

    @property
    def all_frozen(self) -> bool:
        return self.weights is None

    def weights_finite(self) -> bool:
        """Whether every trained weight is finite after an update."""
        return all_finite(*self.params)
