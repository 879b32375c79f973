"""Loss splits: how the losses of a batch become the ``m`` objectives of Jacobian descent.

A split is a pure function from the :class:`~models.loss_terms.LossTerms` of the supervision steps of
one micro-batch (one entry unless the split is a supervision stack) to a 1-D tensor of ``m``
objectives. Each registered function states ``m`` and how each objective is formed.

Notation (one rank's micro-batch): ``B`` samples, ``S`` scored positions, ``K`` supervision steps,
``H`` H-cycles; ``lm`` is the ``[B, S]`` LM loss, ``halt`` the ``[B]`` weighted halting loss
``0.5 * (q_halt + q_continue)`` (:meth:`LossTerms.halting`), ``c_i`` the summed LM loss of H-cycle
``i`` (``c_{H-1}`` is the final LM loss) and ``w`` is ``jd.intermediate_loss_weight``. All terms are
already divided by the global batch size.

Conventions:

* Where the study's split is a partition of the gradient-descent (GD) loss, the objectives sum to
  it: ``objectives.sum() == sum(t.total() for t in steps)``. The JD step multiplies the aggregated
  vector by ``m``, so the ``mean`` aggregator reproduces GD exactly (``m * mean(J) = J^T 1``).
* The internal-cycle stacks add the intermediate cycles' losses to the GD loss (that is their
  purpose); their objectives sum to ``GD loss + w * sum_{i<H-1} c_i`` (``stack_internal_losses_only``:
  ``w * sum_i c_i + sum(halt)``), and the ``mean`` aggregator reproduces GD on that sum.
* Halting "in": the halting loss is spread into the LM objectives; "out": it forms objectives of
  its own. The halting term folds in the Q-continue loss when ``arch.no_ACT_continue=false``.
* Objectives are *shared* (the same objective on every rank: its global value is the sum over
  ranks) or *per instance* (they belong to this rank's samples). Shared objectives come first;
  :attr:`SplitSpec.num_shared` says how many there are.

Differences from the study's code (kept on purpose): the ``iwrm_pixelwise*`` and supervision-stack
pixelwise splits spread each sample's own halting loss over that sample's positions (the study
spread the batch's total), so every objective of an IWRM split depends on one instance only; the
supervision stacks keep each step's halting loss in its objectives (the study's stacks ran without
halting), so they partition the GD loss of the ``K`` steps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from jd.config import JDConfig
from models.loss_terms import LossTerms

SplitFn = Callable[[Sequence[LossTerms], float], Tensor]
"""``(steps, intermediate_loss_weight) -> objectives [m]``."""


@dataclass(frozen=True)
class _Entry:
    fn: SplitFn
    kind: str  # "plain" | "internal_stack" | "supervision_stack"
    per_instance: bool
    needs_halting_objective: bool  # the halting loss is an objective of its own
    num_objectives: Callable[[int, int, int, int], int]  # (B, S, H, K) -> m
    num_shared: Callable[[int, int, int, int], int]  # (B, S, H, K) -> leading shared objectives


_REGISTRY: dict[str, _Entry] = {}


def _register(
    name: str,
    *,
    kind: str = "plain",
    per_instance: bool = False,
    needs_halting_objective: bool = False,
    num_objectives: Callable[[int, int, int, int], int],
    num_shared: Callable[[int, int, int, int], int] | None = None,
) -> Callable[[SplitFn], SplitFn]:
    def decorate(fn: SplitFn) -> SplitFn:
        shared = num_shared if num_shared is not None else ((lambda B, S, H, K: 0) if per_instance else num_objectives)
        _REGISTRY[name] = _Entry(fn, kind, per_instance, needs_halting_objective, num_objectives, shared)
        return fn

    return decorate


def split_names() -> list[str]:
    """Every accepted ``jd.split`` value."""
    return sorted(_REGISTRY)


def _single(steps: Sequence[LossTerms], name: str) -> LossTerms:
    if len(steps) != 1:
        raise ValueError(f"split {name!r} takes the losses of one supervision step, got {len(steps)}")
    return steps[0]


def _internal(terms: LossTerms, name: str) -> list[Tensor]:
    if terms.internal_lm is None:
        raise ValueError(
            f"split {name!r} needs one LM loss per H-cycle: run the loss head with keep_cycle_logits=True "
            "(the split's needs_cycle_logits is True)"
        )
    return terms.internal_lm


# ---------------------------------------------------------------------------------- GD and pairs
@_register("none", num_objectives=lambda B, S, H, K: 1)
def gd(steps: Sequence[LossTerms], intermediate_loss_weight: float) -> Tensor:
    """m = 1: the GD loss ``sum(lm) + sum(halt)``. The JD step never calls it: ``none`` is a plain
    ``loss.backward()``; the function exists so that every split has objectives to compare."""
    return _single(steps, "none").total().reshape(1)


@_register("lm_loss_vs_q_halt_loss", needs_halting_objective=True, num_objectives=lambda B, S, H, K: 2)
def lm_loss_vs_q_halt_loss(steps: Sequence[LossTerms], intermediate_loss_weight: float) -> Tensor:
    """m = 2: ``[sum(lm), sum(halt)]``: predicting the answer vs. knowing when to stop. Shared."""
    terms = _single(steps, "lm_loss_vs_q_halt_loss")
    return torch.stack([terms.lm.sum(), terms.halting().sum()])


# ------------------------------------------------------------------------------------------ IWRM
@_register("iwrm_with_q_halt_in", per_instance=True, num_objectives=lambda B, S, H, K: B)
def iwrm_with_q_halt_in(steps: Sequence[LossTerms], intermediate_loss_weight: float) -> Tensor:
    """m = B: objective ``b`` is sample ``b``'s loss ``sum_s lm[b, s] + halt[b]`` (instance-wise risk
    minimisation). Per instance."""
    return _single(steps, "iwrm_with_q_halt_in").per_sample()


@_register(
    "iwrm_with_q_halt_out", per_instance=True, needs_halting_objective=True, num_objectives=lambda B, S, H, K: 2 * B
)
def iwrm_with_q_halt_out(steps: Sequence[LossTerms], intermediate_loss_weight: float) -> Tensor:
    """m = 2B (as in the study): ``[sum_s lm[0, s], ..., sum_s lm[B-1, s], halt[0], ..., halt[B-1]]``,
    each sample's LM loss and its halting loss as separate objectives. Per instance."""
    terms = _single(steps, "iwrm_with_q_halt_out")
    return torch.cat([terms.lm.sum(dim=1), terms.halting()])


# ------------------------------------------------------------------------------------- pixelwise
@_register("pixelwise_q_halt_in", num_objectives=lambda B, S, H, K: S)
def pixelwise_q_halt_in(steps: Sequence[LossTerms], intermediate_loss_weight: float) -> Tensor:
    """m = S: objective ``s`` is position ``s``'s LM loss summed over the batch plus an equal share of
    the halting loss, ``sum_b lm[b, s] + sum(halt) / S``. Shared (position ``s`` on every rank)."""
    terms = _single(steps, "pixelwise_q_halt_in")
    seq_len = terms.lm.shape[1]
    return terms.lm.sum(dim=0) + terms.halting().sum() / seq_len


@_register(
    "pixelwise_q_halt_out",
    per_instance=True,
    needs_halting_objective=True,
    num_objectives=lambda B, S, H, K: S + B,
    num_shared=lambda B, S, H, K: S,
)
def pixelwise_q_halt_out(steps: Sequence[LossTerms], intermediate_loss_weight: float) -> Tensor:
    """m = S + B (as in the study): ``[sum_b lm[b, 0], ..., sum_b lm[b, S-1], halt[0], ..., halt[B-1]]``.
    The S position objectives are shared, the B halting objectives are per instance."""
    terms = _single(steps, "pixelwise_q_halt_out")
    return torch.cat([terms.lm.sum(dim=0), terms.halting()])


@_register("iwrm_pixelwise_q_halt_in", per_instance=True, num_objectives=lambda B, S, H, K: B * S)
def iwrm_pixelwise_q_halt_in(steps: Sequence[LossTerms], intermediate_loss_weight: float) -> Tensor:
    """m = B*S: objective ``(b, s)`` (row-major) is ``lm[b, s] + halt[b] / S``: one objective per
    predicted token, each carrying an equal share of its own sample's halting loss. Per instance."""
    terms = _single(steps, "iwrm_pixelwise_q_halt_in")
    seq_len = terms.lm.shape[1]
    return (terms.lm + terms.halting().unsqueeze(1) / seq_len).flatten()


@_register(
    "iwrm_pixelwise_q_halt_out",
    per_instance=True,
    needs_halting_objective=True,
    num_objectives=lambda B, S, H, K: B * S + B,
)
def iwrm_pixelwise_q_halt_out(steps: Sequence[LossTerms], intermediate_loss_weight: float) -> Tensor:
    """m = B*S + B: ``[lm[0, 0], ..., lm[B-1, S-1], halt[0], ..., halt[B-1]]``. Per instance."""
    terms = _single(steps, "iwrm_pixelwise_q_halt_out")
    return torch.cat([terms.lm.flatten(), terms.halting()])


# ------------------------------------------------------------------------ internal-cycle stacks
@_register("stack_internal_losses", kind="internal_stack", num_objectives=lambda B, S, H, K: H)
def stack_internal_losses(steps: Sequence[LossTerms], intermediate_loss_weight: float) -> Tensor:
    """m = H: ``[w * c_0, ..., w * c_{H-2}, c_{H-1}] + sum(halt) / H``: each H-cycle's LM loss is an
    objective (intermediate cycles weighted by ``w``, the final one is the GD LM loss), each with an
    equal share of the halting loss. Sums to ``GD loss + w * sum_{i<H-1} c_i``. Shared."""
    terms = _single(steps, "stack_internal_losses")
    cycles = _internal(terms, "stack_internal_losses")
    sums = [intermediate_loss_weight * c.sum() for c in cycles[:-1]] + [terms.lm.sum()]
    return torch.stack(sums) + terms.halting().sum() / len(sums)


@_register("stack_internal_losses_only", kind="internal_stack", num_objectives=lambda B, S, H, K: H)
def stack_internal_losses_only(steps: Sequence[LossTerms], intermediate_loss_weight: float) -> Tensor:
    """m = H: ``[w * c_0, ..., w * c_{H-1}] + sum(halt) / H``: the per-cycle losses only, the final
    cycle treated like the others (also weighted by ``w``; no separate GD LM objective). Sums to
    ``w * sum_i c_i + sum(halt)`` (the same sum as ``stack_internal_losses`` when ``w = 1``). Shared."""
    terms = _single(steps, "stack_internal_losses_only")
    cycles = _internal(terms, "stack_internal_losses_only")
    sums = torch.stack([c.sum() for c in cycles])
    return intermediate_loss_weight * sums + terms.halting().sum() / len(cycles)


@_register("stack_internal_and_sum", kind="internal_stack", num_objectives=lambda B, S, H, K: 1)
def stack_internal_and_sum(steps: Sequence[LossTerms], intermediate_loss_weight: float) -> Tensor:
    """m = 1: ``GD loss + w * sum_{i<H-1} c_i``: deep supervision of every H-cycle, summed (GD on
    the augmented loss). Shared."""
    terms = _single(steps, "stack_internal_and_sum")
    cycles = _internal(terms, "stack_internal_and_sum")
    intermediate = sum((c.sum() for c in cycles[:-1]), terms.lm.new_zeros(()))
    return (terms.total() + intermediate_loss_weight * intermediate).reshape(1)


# ---------------------------------------------------------------------------- supervision stacks
@_register("stack_supervisions", kind="supervision_stack", num_objectives=lambda B, S, H, K: K)
def stack_supervisions(steps: Sequence[LossTerms], intermediate_loss_weight: float) -> Tensor:
    """m = K: objective ``k`` is supervision step ``k``'s GD loss ``steps[k].total()``. Shared."""
    return torch.stack([t.total() for t in steps])


@_register("stack_supervisions_and_sum", kind="supervision_stack", num_objectives=lambda B, S, H, K: 1)
def stack_supervisions_and_sum(steps: Sequence[LossTerms], intermediate_loss_weight: float) -> Tensor:
    """m = 1: the K steps' GD losses summed (GD through K kept graphs, one optimizer step). Shared."""
    return torch.stack([t.total() for t in steps]).sum().reshape(1)


@_register(
    "stack_supervisions_and_iwrm", kind="supervision_stack", per_instance=True, num_objectives=lambda B, S, H, K: K * B
)
def stack_supervisions_and_iwrm(steps: Sequence[LossTerms], intermediate_loss_weight: float) -> Tensor:
    """m = K*B: objective ``(k, b)`` (step-major) is sample ``b``'s loss at step ``k``,
    ``steps[k].per_sample()[b]``. Per instance."""
    return torch.cat([t.per_sample() for t in steps])


@_register("stack_supervisions_and_pixelwise", kind="supervision_stack", num_objectives=lambda B, S, H, K: K * S)
def stack_supervisions_and_pixelwise(steps: Sequence[LossTerms], intermediate_loss_weight: float) -> Tensor:
    """m = K*S: objective ``(k, s)`` is ``sum_b steps[k].lm[b, s] + sum(steps[k].halt) / S``. Shared."""
    return torch.cat([t.lm.sum(dim=0) + t.halting().sum() / t.lm.shape[1] for t in steps])


@_register(
    "stack_supervisions_and_iwrm_pixelwise",
    kind="supervision_stack",
    per_instance=True,
    num_objectives=lambda B, S, H, K: K * B * S,
)
def stack_supervisions_and_iwrm_pixelwise(steps: Sequence[LossTerms], intermediate_loss_weight: float) -> Tensor:
    """m = K*B*S: objective ``(k, b, s)`` is ``steps[k].lm[b, s] + steps[k].halt[b] / S``. Per instance."""
    return torch.cat([(t.lm + t.halting().unsqueeze(1) / t.lm.shape[1]).flatten() for t in steps])


# ------------------------------------------------------------------------------------- the spec
@dataclass(frozen=True)
class SplitSpec:
    """A registered split bound to the ``jd.*`` values it depends on.

    Attributes:
        name: the ``jd.split`` value.
        max_supervisions: ``jd.max_supervisions`` (supervision stacks only).
        intermediate_loss_weight: ``jd.intermediate_loss_weight`` (internal-cycle stacks only).
    """

    name: str
    max_supervisions: int = 4
    intermediate_loss_weight: float = 1.0

    @property
    def _entry(self) -> _Entry:
        return _REGISTRY[self.name]

    @property
    def is_gd(self) -> bool:
        """``jd.split=none``: plain gradient descent, no JD machinery."""
        return self.name == "none"

    @property
    def needs_cycle_logits(self) -> bool:
        """The loss head must run with ``keep_cycle_logits=True`` (internal-cycle stacks)."""
        return self._entry.kind == "internal_stack"

    @property
    def is_supervision_stack(self) -> bool:
        return self._entry.kind == "supervision_stack"

    @property
    def per_instance(self) -> bool:
        """Some objectives belong to this rank's samples (IWRM and its hybrids, ``pixelwise_q_halt_out``)."""
        return self._entry.per_instance

    @property
    def needs_halting_objective(self) -> bool:
        """The halting loss is an objective of its own (``lm_loss_vs_q_halt_loss`` and the ``*_out`` splits)."""
        return self._entry.needs_halting_objective

    def supervision_steps(self, halt_max_steps: int) -> int:
        """ACT steps the trainer runs, graphs kept, before one optimizer step: ``min(max_supervisions,
        halt_max_steps)`` for a supervision stack, 1 otherwise."""
        return min(self.max_supervisions, halt_max_steps) if self.is_supervision_stack else 1

    def num_objectives(self, *, batch_size: int, seq_len: int, H_cycles: int, supervision_steps: int = 1) -> int:
        """``m`` for a micro-batch of these sizes (before ``jd.n_groups``)."""
        return self._entry.num_objectives(batch_size, seq_len, H_cycles, supervision_steps)

    def num_shared(self, *, batch_size: int, seq_len: int, H_cycles: int, supervision_steps: int = 1) -> int:
        """How many leading objectives are shared across ranks; the rest are per instance."""
        return self._entry.num_shared(batch_size, seq_len, H_cycles, supervision_steps)

    def objectives(self, steps: Sequence[LossTerms]) -> Tensor:
        """The objective vector ``[m]`` of one micro-batch's supervision steps."""
        if len(steps) == 0:
            raise ValueError(f"split {self.name!r} got no LossTerms")
        return self._entry.fn(steps, self.intermediate_loss_weight)

    def shared_count(self, steps: Sequence[LossTerms]) -> int:
        """:meth:`num_shared` for the sizes of ``steps``."""
        first = steps[0]
        H = len(first.internal_lm) if first.internal_lm is not None else 1
        return self.num_shared(batch_size=first.lm.shape[0], seq_len=first.lm.shape[1], H_cycles=H, supervision_steps=len(steps))

    def describe(self) -> str:
        """The registered function's docstring: what ``m`` is and how each objective is formed."""
        return (self._entry.fn.__doc__ or "").strip()


def get_split(name: str, *, max_supervisions: int = 4, intermediate_loss_weight: float = 1.0) -> SplitSpec:
    """The split registered as ``name``; unknown names raise ``ValueError`` listing the accepted ones."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown jd.split {name!r}; accepted: {', '.join(split_names())}")
    return SplitSpec(name, max_supervisions=max_supervisions, intermediate_loss_weight=intermediate_loss_weight)


def split_from_config(config: JDConfig) -> SplitSpec:
    return get_split(
        config.split, max_supervisions=config.max_supervisions, intermediate_loss_weight=config.intermediate_loss_weight
    )


# ------------------------------------------------------------------------------ bucket grouping
def bucket_matrix(m: int, n_groups: int, generator: torch.Generator) -> Tensor:
    """The ``[n_groups, m]`` 0/1 matrix of :func:`group_objectives` (one random permutation from ``generator``)."""
    if n_groups > m:
        raise ValueError(f"jd.n_groups={n_groups} is larger than the split's number of objectives m={m}")
    permutation = torch.randperm(m, generator=generator)
    bucket_of = torch.empty(m, dtype=torch.long)
    bucket_of[permutation] = torch.arange(m) % n_groups
    matrix = torch.zeros(n_groups, m)
    matrix[bucket_of, torch.arange(m)] = 1.0
    return matrix


def group_objectives(objectives: Tensor, n_groups: int, generator: torch.Generator) -> Tensor:
    """Randomly bucket ``m`` objectives into ``n_groups`` sums (``jd.n_groups``), for any split.

    A fresh random permutation (drawn from ``generator``, on the CPU) deals the objectives round-robin
    into the buckets, so when ``m`` is not a multiple of ``n_groups`` the bucket sizes differ by at
    most one (the first ``m % n_groups`` buckets hold one more). The buckets sum to the same total as
    the objectives, so the GD-equivalence of the ``mean`` aggregator is kept.
    """
    matrix = bucket_matrix(objectives.shape[0], n_groups, generator)
    return matrix.to(objectives.device, objectives.dtype) @ objectives


# ------------------------------------------------------------------------------------ validation
def validate_split(
    config: JDConfig,
    *,
    halt_max_steps: int,
    H_cycles: int,
    no_ACT_continue: bool,
    batch_size: int | None = None,
    seq_len: int | None = None,
) -> None:
    """Check ``jd.split`` (and ``jd.n_groups`` where ``m`` is known) against the architecture, before any compute.

    Raises ``ValueError`` with a one-line message for an unknown split, a split that makes the
    halting loss an objective while halting is off (``halt_max_steps == 1``: the Q-head never acts),
    a supervision stack with ``halt_max_steps == 1``, an internal-cycle stack with ``H_cycles == 1``,
    or ``n_groups`` larger than ``m``. ``batch_size`` (per rank and micro-batch) and ``seq_len``,
    when given, let it check ``n_groups`` for every split. ``no_ACT_continue`` only decides whether
    the halting objectives include the Q-continue loss, which every split accepts.
    """
    del no_ACT_continue  # the halting term folds Q-continue in either way
    spec = split_from_config(config)
    if spec.needs_halting_objective and halt_max_steps == 1:
        raise ValueError(
            f"jd.split={spec.name} makes the halting loss an objective, but halting is off (arch.halt_max_steps=1); "
            "use a *_q_halt_in split or set arch.halt_max_steps > 1"
        )
    if spec.is_supervision_stack and halt_max_steps == 1:
        raise ValueError(
            f"jd.split={spec.name} stacks supervision steps, but arch.halt_max_steps=1 gives only one; set arch.halt_max_steps > 1"
        )
    if spec.needs_cycle_logits and H_cycles == 1:
        raise ValueError(f"jd.split={spec.name} stacks H-cycle losses, but arch.H_cycles=1 gives only one; set arch.H_cycles > 1")
    if config.n_groups is not None:
        if spec.is_gd:
            raise ValueError("jd.n_groups groups JD objectives; it has no meaning with jd.split=none")
        m = _static_num_objectives(spec, halt_max_steps=halt_max_steps, H_cycles=H_cycles, batch_size=batch_size, seq_len=seq_len)
        if m is not None and config.n_groups > m:
            raise ValueError(f"jd.n_groups={config.n_groups} is larger than jd.split={spec.name}'s number of objectives m={m}")


def _static_num_objectives(
    spec: SplitSpec, *, halt_max_steps: int, H_cycles: int, batch_size: int | None, seq_len: int | None
) -> int | None:
    """``m`` when it can be known from the given sizes (probing with two batch/sequence sizes)."""
    K = spec.supervision_steps(halt_max_steps)
    probes = [(batch_size or b, seq_len or s) for b, s in ((2, 3), (5, 7))]
    values = {spec.num_objectives(batch_size=b, seq_len=s, H_cycles=H_cycles, supervision_steps=K) for b, s in probes}
    return values.pop() if len(values) == 1 else None
