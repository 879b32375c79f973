"""Loss splits: how the losses of a batch become the ``m`` objectives of Jacobian descent.

A split is a pure function from the :class:`~models.loss_terms.LossTerms` of the supervision steps of
one micro-batch (one entry unless the split is a supervision stack) to a 1-D tensor of ``m``
objectives. Each registered function states ``m`` and how each objective is formed.

Notation (one rank's micro-batch): ``B`` samples, ``S`` scored positions, ``K`` supervision steps,
``H`` H-cycles; ``lm`` is the ``[B, S]`` LM loss, ``halt`` the ``[B]`` weighted halting loss
``0.5 * (q_halt + q_continue)`` (:meth:`LossTerms.halting`), ``c_i`` the summed LM loss of H-cycle
``i`` (``c_{H-1}`` is the final LM loss), ``d_i`` its differential loss (below), ``w`` is
``jd.intermediate_loss_weight`` and ``h`` is ``arch.halt_max_steps``. All terms are already divided by
the global batch size.

Conventions:

* Where the study's split is a partition of the gradient-descent (GD) loss, the objectives sum to
  it: ``objectives.sum() == sum(t.total() for t in steps)``. The JD step multiplies the aggregated
  vector by ``m``, so the ``mean`` aggregator reproduces GD exactly (``m * mean(J) = J^T 1``).
* The internal-cycle stacks add the intermediate cycles' losses to the GD loss (that is their
  purpose), and the study's supervision stacks scale and drop terms; the ``mean`` aggregator
  reproduces GD on the sum of their objectives, which each docstring states.
* Halting "in": the halting loss is spread into the LM objectives; "out": it forms objectives of
  its own. The halting term folds in the Q-continue loss when ``arch.no_ACT_continue=false``.
* Objectives are *shared* (the same objective on every rank: its global value is the sum over
  ranks) or *per instance* (they belong to this rank's samples). Shared objectives come first;
  :attr:`SplitSpec.num_shared` says how many there are.

The stacks have two semantics each, chosen by :class:`SplitOptions` (``jd.*``), the JD study's by default:

* Supervision stacks, ``jd.supervision_loop``. ``same_batch`` (the study): one optimizer step takes ONE
  batch and runs supervision steps on it, a fresh ACT carry, until every sample has halted (at most
  ``K_max = min(jd.max_supervisions, arch.halt_max_steps)``; ``jd.max_supervisions=null``: ``h``, the study's), so ``K`` is the number of steps run;
  objective ``k`` holds step ``k``'s LM loss divided by ``arch.halt_max_steps`` (``h``) and no halting
  term. ``carry``: ``K = K_max`` steps, each reading the next batch into the ACT carry like GD does;
  objectives hold each step's whole GD loss (LM and halting), undivided, so they partition it.
* Internal-cycle stacks, ``jd.internal_loss``. ``differential`` (the study): ``d_i`` is the loss of
  ``logits_i - logits_{i-1}.detach()`` (``logits_{-1} = 0``) for every H-cycle ``i``, per token, NOT
  divided by the sample's token count (:attr:`LossTerms.internal_differential`); no halting term.
  ``plain``: ``c_i``, each cycle's own LM loss, plus a share of the halting loss.

Differences from the study's code that remain (the README's table lists them all): the
``iwrm_pixelwise*`` splits spread each sample's own halting loss over that sample's positions (the
study spread the batch's total), so every objective of an IWRM split depends on one instance only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from jd.config import JDConfig
from models.loss_terms import LossTerms

SUPERVISION_LOOPS = ("same_batch", "carry")
INTERNAL_LOSSES = ("differential", "plain")


@dataclass(frozen=True)
class SplitOptions:
    """The ``jd.*`` (and ``arch.halt_max_steps``) values a split's objectives depend on.

    Attributes:
        intermediate_loss_weight: ``w``, the weight of the intermediate cycles' losses (internal stacks).
        internal_loss: ``differential`` (the study's ``d_i``) or ``plain`` (``c_i``), internal stacks.
        supervision_loop: ``same_batch`` (the study's loop) or ``carry``, supervision stacks.
        halt_max_steps: ``h``, which divides each step's LM loss in the ``same_batch`` loop.
    """

    intermediate_loss_weight: float = 1.0
    internal_loss: str = "differential"
    supervision_loop: str = "same_batch"
    halt_max_steps: int = 1

    @property
    def differential(self) -> bool:
        return self.internal_loss == "differential"

    @property
    def same_batch(self) -> bool:
        return self.supervision_loop == "same_batch"


SplitFn = Callable[[Sequence[LossTerms], SplitOptions], Tensor]
"""``(steps, options) -> objectives [m]``."""
CountFn = Callable[[int, int, int, int, SplitOptions], int]
"""``(B, S, H, K, options) -> a count``."""


@dataclass(frozen=True)
class _Entry:
    fn: SplitFn
    kind: str  # "plain" | "internal_stack" | "supervision_stack"
    per_instance: bool
    needs_halting_objective: bool  # the halting loss is an objective of its own
    num_objectives: CountFn  # m
    num_shared: CountFn  # leading shared objectives


_REGISTRY: dict[str, _Entry] = {}


def _register(
    name: str,
    *,
    kind: str = "plain",
    per_instance: bool = False,
    needs_halting_objective: bool = False,
    num_objectives: CountFn,
    num_shared: CountFn | None = None,
) -> Callable[[SplitFn], SplitFn]:
    def decorate(fn: SplitFn) -> SplitFn:
        shared = num_shared if num_shared is not None else ((lambda B, S, H, K, o: 0) if per_instance else num_objectives)
        _REGISTRY[name] = _Entry(fn, kind, per_instance, needs_halting_objective, num_objectives, shared)
        return fn

    return decorate


def split_names() -> list[str]:
    """Every accepted ``jd.split`` value."""
    return sorted(_REGISTRY)


def single_objective(name: str) -> bool:
    """Whether split ``name`` always gives one objective (``none``, the ``*_and_sum`` stacks): any aggregator
    then returns that objective's gradient, so the run is gradient descent on it (an unknown name: ``False``).

    >>> single_objective("stack_supervisions_and_sum"), single_objective("iwrm_with_q_halt_in")
    (True, False)
    """
    entry = _REGISTRY.get(name)
    options = SplitOptions()
    return entry is not None and all(entry.num_objectives(B, S, H, K, options) == 1 for B, S, H, K in ((2, 3, 2, 2), (5, 7, 3, 4)))


def method_of(config: JDConfig) -> str:
    """``gd``, ``aggregator:NAME`` or ``scalarizer:NAME``: how ``config``'s objectives become one update (``gd``
    for a split with one objective, e.g. ``stack_supervisions_and_sum``: every aggregator returns its gradient).

    >>> method_of(JDConfig(split="iwrm_with_q_halt_in", scalarizer="famo")), method_of(JDConfig(split="stack_supervisions_and_sum"))
    ('scalarizer:famo', 'gd')
    """
    if config.split == "none" or (config.scalarizer is None and single_objective(config.split)):
        return "gd"
    return f"scalarizer:{config.scalarizer}" if config.scalarizer else f"aggregator:{config.aggregator_name}"


def _single(steps: Sequence[LossTerms], name: str) -> LossTerms:
    if len(steps) != 1:
        raise ValueError(f"split {name!r} takes the losses of one supervision step, got {len(steps)}")
    return steps[0]


def _internal(terms: LossTerms, name: str, differential: bool = False) -> list[Tensor]:
    cycles = terms.internal_differential if differential else terms.internal_lm
    if cycles is None:
        raise ValueError(
            f"split {name!r} needs one {'differential ' if differential else ''}LM loss per H-cycle: run the loss head "
            f"with keep_cycle_logits=True{' and differential_cycles=True' if differential else ''} "
            "(the split's needs_cycle_logits / needs_differential_cycles)"
        )
    return cycles


# ---------------------------------------------------------------------------------- GD and pairs
@_register("none", num_objectives=lambda B, S, H, K, o: 1)
def gd(steps: Sequence[LossTerms], options: SplitOptions) -> Tensor:
    """m = 1: the GD loss ``sum(lm) + sum(halt)``. The JD step never calls it: ``none`` is a plain
    ``loss.backward()``; the function exists so that every split has objectives to compare."""
    return _single(steps, "none").total().reshape(1)


@_register("lm_loss_vs_q_halt_loss", needs_halting_objective=True, num_objectives=lambda B, S, H, K, o: 2)
def lm_loss_vs_q_halt_loss(steps: Sequence[LossTerms], options: SplitOptions) -> Tensor:
    """m = 2: ``[sum(lm), sum(halt)]``: predicting the answer vs. knowing when to stop. Shared."""
    terms = _single(steps, "lm_loss_vs_q_halt_loss")
    return torch.stack([terms.lm.sum(), terms.halting().sum()])


# ------------------------------------------------------------------------------------------ IWRM
@_register("iwrm_with_q_halt_in", per_instance=True, num_objectives=lambda B, S, H, K, o: B)
def iwrm_with_q_halt_in(steps: Sequence[LossTerms], options: SplitOptions) -> Tensor:
    """m = B: objective ``b`` is sample ``b``'s loss ``sum_s lm[b, s] + halt[b]`` (instance-wise risk
    minimisation). Per instance."""
    return _single(steps, "iwrm_with_q_halt_in").per_sample()


@_register("iwrm_with_q_halt_out", per_instance=True, needs_halting_objective=True, num_objectives=lambda B, S, H, K, o: 2 * B)
def iwrm_with_q_halt_out(steps: Sequence[LossTerms], options: SplitOptions) -> Tensor:
    """m = 2B (as in the study): ``[sum_s lm[0, s], ..., sum_s lm[B-1, s], halt[0], ..., halt[B-1]]``,
    each sample's LM loss and its halting loss as separate objectives. Per instance."""
    terms = _single(steps, "iwrm_with_q_halt_out")
    return torch.cat([terms.lm.sum(dim=1), terms.halting()])


# ------------------------------------------------------------------------------------- pixelwise
@_register("pixelwise_q_halt_in", num_objectives=lambda B, S, H, K, o: S)
def pixelwise_q_halt_in(steps: Sequence[LossTerms], options: SplitOptions) -> Tensor:
    """m = S: objective ``s`` is position ``s``'s LM loss summed over the batch plus an equal share of
    the halting loss, ``sum_b lm[b, s] + sum(halt) / S``. Shared (position ``s`` on every rank)."""
    terms = _single(steps, "pixelwise_q_halt_in")
    seq_len = terms.lm.shape[1]
    return terms.lm.sum(dim=0) + terms.halting().sum() / seq_len


@_register(
    "pixelwise_q_halt_out",
    per_instance=True,
    needs_halting_objective=True,
    num_objectives=lambda B, S, H, K, o: S + B,
    num_shared=lambda B, S, H, K, o: S,
)
def pixelwise_q_halt_out(steps: Sequence[LossTerms], options: SplitOptions) -> Tensor:
    """m = S + B (as in the study): ``[sum_b lm[b, 0], ..., sum_b lm[b, S-1], halt[0], ..., halt[B-1]]``.
    The S position objectives are shared, the B halting objectives are per instance."""
    terms = _single(steps, "pixelwise_q_halt_out")
    return torch.cat([terms.lm.sum(dim=0), terms.halting()])


@_register("iwrm_pixelwise_q_halt_in", per_instance=True, num_objectives=lambda B, S, H, K, o: B * S)
def iwrm_pixelwise_q_halt_in(steps: Sequence[LossTerms], options: SplitOptions) -> Tensor:
    """m = B*S: objective ``(b, s)`` (row-major) is ``lm[b, s] + halt[b] / S``: one objective per
    predicted token, each carrying an equal share of its own sample's halting loss. Per instance."""
    terms = _single(steps, "iwrm_pixelwise_q_halt_in")
    seq_len = terms.lm.shape[1]
    return (terms.lm + terms.halting().unsqueeze(1) / seq_len).flatten()


@_register(
    "iwrm_pixelwise_q_halt_out",
    per_instance=True,
    needs_halting_objective=True,
    num_objectives=lambda B, S, H, K, o: B * S + B,
)
def iwrm_pixelwise_q_halt_out(steps: Sequence[LossTerms], options: SplitOptions) -> Tensor:
    """m = B*S + B: ``[lm[0, 0], ..., lm[B-1, S-1], halt[0], ..., halt[B-1]]``. Per instance."""
    terms = _single(steps, "iwrm_pixelwise_q_halt_out")
    return torch.cat([terms.lm.flatten(), terms.halting()])


# ------------------------------------------------------------------------ internal-cycle stacks
def _differential_sums(terms: LossTerms, name: str, options: SplitOptions) -> list[Tensor]:
    return [options.intermediate_loss_weight * d.sum() for d in _internal(terms, name, differential=True)]


@_register("stack_internal_losses", kind="internal_stack", num_objectives=lambda B, S, H, K, o: H + 1 if o.differential else H)
def stack_internal_losses(steps: Sequence[LossTerms], options: SplitOptions) -> Tensor:
    """m = H + 1 (``differential``) or H (``plain``). ``differential`` (the study): ``[sum(lm), w * d_0, ..., w * d_{H-1}]``, the final LM
    loss and every cycle's weighted differential loss, no halting term.
    ``plain``: ``[w * c_0, ..., w * c_{H-2}, c_{H-1}] + sum(halt) / H``: each H-cycle's LM loss
    (intermediate ones weighted by ``w``, the final one is the GD LM loss), each with an equal share of
    the halting loss; sums to ``GD loss + w * sum_{i<H-1} c_i``. Shared."""
    terms = _single(steps, "stack_internal_losses")
    if options.differential:
        return torch.stack([terms.lm.sum(), *_differential_sums(terms, "stack_internal_losses", options)])
    cycles = _internal(terms, "stack_internal_losses")
    sums = [options.intermediate_loss_weight * c.sum() for c in cycles[:-1]] + [terms.lm.sum()]
    return torch.stack(sums) + terms.halting().sum() / len(sums)


@_register("stack_internal_losses_only", kind="internal_stack", num_objectives=lambda B, S, H, K, o: H)
def stack_internal_losses_only(steps: Sequence[LossTerms], options: SplitOptions) -> Tensor:
    """m = H. ``differential`` (the study): ``[w * d_0, ..., w * d_{H-1}]``, the cycles' weighted
    differential losses only (they telescope onto the final logits), no halting term.
    ``plain``: ``[w * c_0, ..., w * c_{H-1}] + sum(halt) / H``, the final cycle weighted like the
    others; sums to ``w * sum_i c_i + sum(halt)``. Shared."""
    terms = _single(steps, "stack_internal_losses_only")
    if options.differential:
        return torch.stack(_differential_sums(terms, "stack_internal_losses_only", options))
    cycles = _internal(terms, "stack_internal_losses_only")
    sums = torch.stack([c.sum() for c in cycles])
    return options.intermediate_loss_weight * sums + terms.halting().sum() / len(cycles)


@_register("stack_internal_and_sum", kind="internal_stack", num_objectives=lambda B, S, H, K, o: 1)
def stack_internal_and_sum(steps: Sequence[LossTerms], options: SplitOptions) -> Tensor:
    """m = 1, GD on the augmented loss. ``differential`` (the study, read as a scalar: its code returns a
    ``[B, S]`` tensor): ``sum(lm) + w * sum_i d_i``. ``plain``: ``GD loss + w * sum_{i<H-1} c_i``. Shared."""
    terms = _single(steps, "stack_internal_and_sum")
    if options.differential:
        return (terms.lm.sum() + sum(_differential_sums(terms, "stack_internal_and_sum", options), terms.lm.new_zeros(()))).reshape(1)
    cycles = _internal(terms, "stack_internal_and_sum")
    intermediate = sum((c.sum() for c in cycles[:-1]), terms.lm.new_zeros(()))
    return (terms.total() + options.intermediate_loss_weight * intermediate).reshape(1)


# ---------------------------------------------------------------------------- supervision stacks
def _step_lm(terms: LossTerms, options: SplitOptions) -> Tensor:
    """A step's ``[B, S]`` LM loss as the stack uses it: divided by ``h`` in the ``same_batch`` loop."""
    return terms.lm / options.halt_max_steps if options.same_batch else terms.lm


def _step_halting(terms: LossTerms, options: SplitOptions) -> Tensor:
    """A step's ``[B]`` halting loss as the stack uses it: none in the ``same_batch`` loop."""
    return torch.zeros_like(terms.q_halt) if options.same_batch else terms.halting()


@_register("stack_supervisions", kind="supervision_stack", num_objectives=lambda B, S, H, K, o: K)
def stack_supervisions(steps: Sequence[LossTerms], options: SplitOptions) -> Tensor:
    """m = K: objective ``k`` is supervision step ``k``'s loss. ``same_batch`` (the study):
    ``sum(lm_k) / h``; ``carry``: its GD loss ``steps[k].total()``. Shared."""
    return torch.stack([_step_lm(t, options).sum() + _step_halting(t, options).sum() for t in steps])


@_register("stack_supervisions_and_sum", kind="supervision_stack", num_objectives=lambda B, S, H, K, o: 1)
def stack_supervisions_and_sum(steps: Sequence[LossTerms], options: SplitOptions) -> Tensor:
    """m = 1: the K steps' losses of ``stack_supervisions`` summed (GD through K kept graphs). Shared."""
    return stack_supervisions(steps, options).sum().reshape(1)


@_register("stack_supervisions_and_iwrm", kind="supervision_stack", per_instance=True, num_objectives=lambda B, S, H, K, o: K * B)
def stack_supervisions_and_iwrm(steps: Sequence[LossTerms], options: SplitOptions) -> Tensor:
    """m = K*B: objective ``(k, b)`` (step-major) is sample ``b``'s loss at step ``k``: ``same_batch``
    ``sum_s lm_k[b, s] / h``; ``carry`` ``steps[k].per_sample()[b]``. Per instance."""
    return torch.cat([_step_lm(t, options).sum(dim=1) + _step_halting(t, options) for t in steps])


@_register("stack_supervisions_and_pixelwise", kind="supervision_stack", num_objectives=lambda B, S, H, K, o: K * S)
def stack_supervisions_and_pixelwise(steps: Sequence[LossTerms], options: SplitOptions) -> Tensor:
    """m = K*S: objective ``(k, s)`` is position ``s`` at step ``k``: ``same_batch`` ``sum_b lm_k[b, s] / h``;
    ``carry`` ``sum_b lm_k[b, s] + sum(halt_k) / S``. Shared."""
    return torch.cat([_step_lm(t, options).sum(dim=0) + _step_halting(t, options).sum() / t.lm.shape[1] for t in steps])


@_register(
    "stack_supervisions_and_iwrm_pixelwise",
    kind="supervision_stack",
    per_instance=True,
    num_objectives=lambda B, S, H, K, o: K * B * S,
)
def stack_supervisions_and_iwrm_pixelwise(steps: Sequence[LossTerms], options: SplitOptions) -> Tensor:
    """m = K*B*S: objective ``(k, b, s)``: ``same_batch`` ``lm_k[b, s] / h``; ``carry``
    ``lm_k[b, s] + halt_k[b] / S``. Per instance."""
    return torch.cat([(_step_lm(t, options) + _step_halting(t, options).unsqueeze(1) / t.lm.shape[1]).flatten() for t in steps])


# ------------------------------------------------------------------------------------- the spec
@dataclass(frozen=True)
class SplitSpec:
    """A registered split bound to the ``jd.*`` values it depends on.

    Attributes:
        name: the ``jd.split`` value.
        max_supervisions: ``jd.max_supervisions`` (supervision stacks only).
        options: the semantics and weights of :class:`SplitOptions`.
    """

    name: str
    max_supervisions: int | None = 4
    options: SplitOptions = SplitOptions()

    @property
    def _entry(self) -> _Entry:
        return _REGISTRY[self.name]

    @property
    def intermediate_loss_weight(self) -> float:
        return self.options.intermediate_loss_weight

    @property
    def is_gd(self) -> bool:
        """``jd.split=none``: plain gradient descent, no JD machinery."""
        return self.name == "none"

    @property
    def needs_cycle_logits(self) -> bool:
        """The loss head must run with ``keep_cycle_logits=True`` (internal-cycle stacks)."""
        return self._entry.kind == "internal_stack"

    @property
    def needs_differential_cycles(self) -> bool:
        """The loss head must also compute the cycles' differential losses (``jd.internal_loss=differential``)."""
        return self.needs_cycle_logits and self.options.differential

    @property
    def is_supervision_stack(self) -> bool:
        return self._entry.kind == "supervision_stack"

    @property
    def same_batch_loop(self) -> bool:
        """A supervision stack run the study's way: one batch per optimizer step, until all halted."""
        return self.is_supervision_stack and self.options.same_batch

    @property
    def per_instance(self) -> bool:
        """Some objectives belong to this rank's samples (IWRM and its hybrids, ``pixelwise_q_halt_out``)."""
        return self._entry.per_instance

    @property
    def needs_halting_objective(self) -> bool:
        """The halting loss is an objective of its own (``lm_loss_vs_q_halt_loss`` and the ``*_out`` splits)."""
        return self._entry.needs_halting_objective

    def supervision_steps(self, halt_max_steps: int) -> int:
        """ACT steps the trainer runs (at most, in the ``same_batch`` loop), graphs kept, before one
        optimizer step: ``min(max_supervisions, halt_max_steps)`` for a supervision stack (``halt_max_steps`` when
        ``max_supervisions`` is ``None``), 1 otherwise."""
        if not self.is_supervision_stack:
            return 1
        return halt_max_steps if self.max_supervisions is None else min(self.max_supervisions, halt_max_steps)

    def batches_per_step(self, halt_max_steps: int) -> int:
        """Global batches one optimizer step reads: one per supervision step with the ACT carry, one in
        the ``same_batch`` loop (and for every other split)."""
        return 1 if self.same_batch_loop else self.supervision_steps(halt_max_steps)

    def num_objectives(self, *, batch_size: int, seq_len: int, H_cycles: int, supervision_steps: int = 1) -> int:
        """``m`` for a micro-batch of these sizes (before ``jd.n_groups``)."""
        return self._entry.num_objectives(batch_size, seq_len, H_cycles, supervision_steps, self.options)

    def num_shared(self, *, batch_size: int, seq_len: int, H_cycles: int, supervision_steps: int = 1) -> int:
        """How many leading objectives are shared across ranks; the rest are per instance."""
        return self._entry.num_shared(batch_size, seq_len, H_cycles, supervision_steps, self.options)

    def objectives(self, steps: Sequence[LossTerms]) -> Tensor:
        """The objective vector ``[m]`` of one micro-batch's supervision steps."""
        if len(steps) == 0:
            raise ValueError(f"split {self.name!r} got no LossTerms")
        return self._entry.fn(steps, self.options)

    def shared_count(self, steps: Sequence[LossTerms]) -> int:
        """:meth:`num_shared` for the sizes of ``steps``."""
        first = steps[0]
        cycles = first.internal_differential if self.needs_differential_cycles else first.internal_lm
        H = len(cycles) if cycles is not None else 1
        return self.num_shared(batch_size=first.lm.shape[0], seq_len=first.lm.shape[1], H_cycles=H, supervision_steps=len(steps))

    def global_num_objectives(
        self, *, batch_size: int, seq_len: int, H_cycles: int, halt_max_steps: int, world_size: int, n_groups: int | None
    ) -> int | None:
        """``m`` over all ranks for one micro-batch per rank (shared objectives once, per-instance ones per
        rank), after ``jd.n_groups``; ``None`` when it changes from step to step (the ``same_batch`` loop)."""
        if self.same_batch_loop:
            return None
        sizes = dict(batch_size=batch_size, seq_len=seq_len, H_cycles=H_cycles, supervision_steps=self.supervision_steps(halt_max_steps))
        m, shared = self.num_objectives(**sizes), self.num_shared(**sizes)
        if n_groups is not None:
            m, shared = min(n_groups, m), (min(n_groups, m) if shared == m else 0)
        return shared + world_size * (m - shared)

    def describe(self) -> str:
        """The registered function's docstring: what ``m`` is and how each objective is formed."""
        return (self._entry.fn.__doc__ or "").strip()


def get_split(
    name: str,
    *,
    max_supervisions: int | None = 4,
    intermediate_loss_weight: float = 1.0,
    internal_loss: str = "differential",
    supervision_loop: str = "same_batch",
    halt_max_steps: int = 1,
) -> SplitSpec:
    """The split registered as ``name``; unknown names or semantics raise ``ValueError`` listing the accepted ones."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown jd.split {name!r}; accepted: {', '.join(split_names())}")
    if internal_loss not in INTERNAL_LOSSES:
        raise ValueError(f"jd.internal_loss={internal_loss!r}; accepted: {', '.join(INTERNAL_LOSSES)}")
    if supervision_loop not in SUPERVISION_LOOPS:
        raise ValueError(f"jd.supervision_loop={supervision_loop!r}; accepted: {', '.join(SUPERVISION_LOOPS)}")
    options = SplitOptions(intermediate_loss_weight, internal_loss, supervision_loop, halt_max_steps)
    return SplitSpec(name, max_supervisions=max_supervisions, options=options)


def split_from_config(config: JDConfig, halt_max_steps: int = 1) -> SplitSpec:
    """The split of ``jd.*``; ``halt_max_steps`` (``arch.halt_max_steps``) scales the ``same_batch`` stacks."""
    return get_split(
        config.split,
        max_supervisions=config.max_supervisions,
        intermediate_loss_weight=config.intermediate_loss_weight,
        internal_loss=config.internal_loss,
        supervision_loop=config.supervision_loop,
        halt_max_steps=halt_max_steps,
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
    no_act: bool = False,
    puzzle_rows_only: bool = False,
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
    spec = split_from_config(config, halt_max_steps)
    if no_act and spec.needs_halting_objective and spec.name != "lm_loss_vs_q_halt_loss":
        raise ValueError(
            f"jd.split={spec.name} makes each halting loss an objective, but arch.no_act=true has no Q-head and no halting "
            "loss (the JD study's own code raises 'RuntimeError: zero-dimensional tensor ... cannot be concatenated' here); "
            "use a *_q_halt_in split or arch.no_act=false"
        )
    if puzzle_rows_only and spec.name == "iwrm_with_q_halt_in" and config.scalarizer is None and config.aggregator_name in ("upgrad", "dualproj"):
        raise ValueError(
            f"freeze_weights=true with jd.frozen_weights=left_out, jd.split=iwrm_with_q_halt_in and jd.aggregator={config.aggregator_name} "
            "is gradient descent by construction: each objective then depends on its own sample's puzzle row only, so the "
            "gradients never conflict and the projection leaves their mean; use jd.frozen_weights=in_jacobian (the JD study)"
        )
    if spec.needs_halting_objective and halt_max_steps == 1:
        raise ValueError(
            f"jd.split={spec.name} makes the halting loss an objective, but halting is off (arch.halt_max_steps=1); "
            "use a *_q_halt_in split or set arch.halt_max_steps > 1"
        )
    if spec.is_supervision_stack and halt_max_steps == 1:
        raise ValueError(f"jd.split={spec.name} stacks supervision steps, but arch.halt_max_steps=1 gives only one; set arch.halt_max_steps > 1")
    if spec.needs_cycle_logits and H_cycles == 1:
        raise ValueError(f"jd.split={spec.name} stacks H-cycle losses, but arch.H_cycles=1 gives only one; set arch.H_cycles > 1")
    if config.n_groups is not None:
        if spec.is_gd:
            raise ValueError("jd.n_groups groups JD objectives; it has no meaning with jd.split=none")
        m = _static_num_objectives(spec, halt_max_steps=halt_max_steps, H_cycles=H_cycles, batch_size=batch_size, seq_len=seq_len)
        if m is not None and config.n_groups > m:
            raise ValueError(f"jd.n_groups={config.n_groups} is larger than jd.split={spec.name}'s number of objectives m={m}")


def _static_num_objectives(spec: SplitSpec, *, halt_max_steps: int, H_cycles: int, batch_size: int | None, seq_len: int | None) -> int | None:
    """``m`` when it can be known from the given sizes (probing with two batch/sequence sizes)."""
    K = spec.supervision_steps(halt_max_steps)
    probes = [(batch_size or b, seq_len or s) for b, s in ((2, 3), (5, 7))]
    values = {spec.num_objectives(batch_size=b, seq_len=s, H_cycles=H_cycles, supervision_steps=K) for b, s in probes}
    return values.pop() if len(values) == 1 else None
