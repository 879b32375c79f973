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
    distributed: Literal["local", "global"] = "local"
    include_puzzle_embedding: bool = True
    intermediate_loss_weight: float = Field(default=1.0, ge=0.0)
    max_supervisions: int = Field(default=4, ge=1)
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
    carry_perturbation_rate: float = Field(default=0.0, ge=0.0)
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
        return self

    @property
    def aggregator_name(self) -> str:
        """The aggregator in use: ``jd.aggregator``, or ``upgrad`` when none was named."""
        return self.aggregator or "upgrad"

    @property
    def method(self) -> str:
        """``gd``, ``aggregator:NAME`` or ``scalarizer:NAME``: how the objectives become one update."""
        if self.split == "none":
            return "gd"
        return f"scalarizer:{self.scalarizer}" if self.scalarizer else f"aggregator:{self.aggregator_name}"

    def check_compilable(self) -> None:
        """Raise ``ValueError`` if a ``torch.compile``-d model cannot run this config: ``torch.vmap``
        (``parallel_chunk_size`` other than 1) cannot run a compiled backward."""
        if self.split != "none" and self.parallel_chunk_size != 1:
            raise ValueError(
                f"jd.parallel_chunk_size={self.parallel_chunk_size} batches Jacobian rows with torch.vmap, which cannot run "
                "a compiled backward; use jd.parallel_chunk_size=1 (the default) or compile=false"
            )
