"""The ``jd.*`` section of the training configuration."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class JDConfig(BaseModel):
    """How the loss is split into objectives and how their Jacobian is aggregated.

    ``split="none"`` is plain gradient descent on the usual weighted sum: no JD machinery runs.
    ``aggregator`` (UPGrad when neither is given) and ``scalarizer`` (a loss-weighting baseline: one
    backward of the scalarized objectives, :mod:`jd.scalarizers`) are alternatives, never both.
    """

    model_config = ConfigDict(extra="forbid")

    split: str = "none"
    aggregator: str | None = Field(default=None, description="a TorchJD aggregator by name; null: upgrad, unless jd.scalarizer is set")
    aggregator_kwargs: dict[str, Any] = Field(default_factory=dict, description="null in YAML, so that Hydra can override it with a dict")
    scalarizer: str | None = Field(default=None, description="a TorchJD scalarizer by name (loss weighting, one backward) instead of an aggregator")
    scalarizer_kwargs: dict[str, Any] = Field(default_factory=dict, description="null in YAML, so that Hydra can override it with a dict")
    n_groups: int | None = Field(default=None, ge=1)
    engine: Literal["auto", "per_sample", "gramian", "autojac", "autogram"] = "auto"
    distributed: Literal["local", "global", "rank_local"] = Field(
        default="local",
        description="several ranks: per-instance splits aggregate each rank's Jacobian (local) or the global one (global); "
        "shared splits always the global one, except with rank_local (the JD study: every split per rank, results summed)",
    )
    include_puzzle_embedding: bool = True
    intermediate_loss_weight: float = Field(default=1.0, ge=0.0)
    max_supervisions: int | None = Field(
        default=4, ge=1, description="supervision stacks: at most this many steps K (null: arch.halt_max_steps, the JD study's K)"
    )
    supervision_loop: Literal["same_batch", "carry"] = Field(
        default="same_batch",
        description="supervision stacks: same_batch (the JD study: one batch per step, until all halted, LM / halt_max_steps, "
        "no halting term) or carry (each step reads the next batch into the ACT carry; whole GD losses)",
    )
    internal_loss: Literal["differential", "plain"] = Field(
        default="differential",
        description="internal-cycle stacks: differential (the JD study: H+1 objectives from logits_i - logits_{i-1}) or plain",
    )
    differential_loss: bool = False
    differential_first_step: Literal["zeros", "replaced_sample"] = Field(
        default="zeros",
        description="jd.differential_loss at a new sample's first step: subtract zeros, or the final logits of the sample it replaced (the JD study)",
    )
    carry_perturbation_rate: float = Field(default=0.0, ge=0.0)
    carry_perturbation: Literal["carried_samples", "stack_steps"] = Field(
        default="carried_samples",
        description="where jd.carry_perturbation_rate applies: before every step, to carried samples (any split), or after "
        "every step of a supervision stack, to every sample (the JD study)",
    )
    puzzle_rows: Literal["per_forward", "shared_in_stack"] = Field(
        default="per_forward",
        description="Jacobian columns of the puzzle-embedding rows: one leaf per forward, or one leaf shared by the "
        "forwards of a same_batch supervision stack (the JD study)",
    )
    frozen_weights: Literal["in_jacobian", "left_out"] = Field(
        default="in_jacobian",
        description="with freeze_weights: the frozen weights stay in the Jacobian (their columns shape the aggregation; "
        "the JD study) or are left out (the puzzle rows alone decide it)",
    )
    update_scale: Literal["num_objectives", "one"] = Field(
        default="num_objectives",
        description="the aggregated vector times m (so mean = GD), or as the aggregator returns it (the JD study)",
    )
    diagnostics: bool = True
    seed: int = Field(default=0, description="seed of the JD step's own generator (jd.n_groups bucketing)")
    parallel_chunk_size: int | None = Field(
        default=1,
        ge=1,
        description="Jacobian rows differentiated at once: 1 (one backward per row, GD-like memory; works compiled), "
        "k > 1 or None (all) batch them with torch.vmap, holding k rows' intermediate gradients at once",
    )

    @field_validator("aggregator_kwargs", "scalarizer_kwargs", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        return {} if value is None else value

    @model_validator(mode="after")
    def _one_method(self) -> JDConfig:
        if self.aggregator is not None and self.scalarizer is not None:
            raise ValueError(
                f"jd.aggregator={self.aggregator} and jd.scalarizer={self.scalarizer}: give one (an aggregator combines the "
                "objectives' gradients, a scalarizer their values)"
            )
        if self.aggregator_kwargs and self.scalarizer is not None:
            raise ValueError("jd.aggregator_kwargs was given with jd.scalarizer; use jd.scalarizer_kwargs")
        if self.scalarizer_kwargs and self.scalarizer is None:
            raise ValueError("jd.scalarizer_kwargs was given without jd.scalarizer")
        if self.split == "none" and (self.aggregator is not None or self.scalarizer is not None):
            self._refuse_method_without_split()
        return self

    def _refuse_method_without_split(self) -> None:
        """A named aggregator or scalarizer with ``jd.split=none`` would train plain GD in silence: a misspelt
        name is named as such (with the closest accepted one), a valid one asks for a split."""
        import difflib

        from jd.aggregators import aggregator_names
        from jd.scalarizers import scalarizer_names

        key, name, names = (
            ("aggregator", self.aggregator, aggregator_names())
            if self.aggregator is not None
            else ("scalarizer", self.scalarizer, scalarizer_names())
        )
        if name not in names:
            close = difflib.get_close_matches(str(name), names, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ValueError(f"unknown jd.{key} {name!r}{hint}; accepted: {', '.join(names)}")
        raise ValueError(
            f"jd.{key}={name} combines the objectives of a loss split, but jd.split=none is plain gradient descent and would "
            f"ignore it; give a split (e.g. jd.split=iwrm_with_q_halt_in; python -m jd lists them) or drop jd.{key}"
        )

    @property
    def aggregator_name(self) -> str:
        """The aggregator in use: ``jd.aggregator``, or ``upgrad`` when none was named."""
        return self.aggregator or "upgrad"

    def check_compilable(self) -> None:
        """Raise ``ValueError`` if a ``torch.compile``-d model cannot run this config: ``torch.vmap``
        (``parallel_chunk_size`` other than 1) cannot run a compiled backward."""
        if self.split != "none" and self.parallel_chunk_size != 1:
            raise ValueError(
                f"jd.parallel_chunk_size={self.parallel_chunk_size} batches Jacobian rows with torch.vmap, which cannot run "
                "a compiled backward; use jd.parallel_chunk_size=1 (the default) or compile=false"
            )
