"""Jacobian descent for TRM training: loss splits, TorchJD aggregators, the backward step and its diagnostics."""

from jd.aggregators import accepted_kwargs, aggregator_names, build_aggregator, gramian_weighting, validate_aggregator
from jd.config import JDConfig
from jd.diagnostics import diagnostics_from_update, diagnostics_from_weights
from jd.splits import SplitSpec, get_split, group_objectives, split_from_config, split_names, validate_split
from jd.step import JDStep, build_jd_step

__all__ = [
    "JDConfig",
    "JDStep",
    "SplitSpec",
    "accepted_kwargs",
    "aggregator_names",
    "build_aggregator",
    "build_jd_step",
    "diagnostics_from_update",
    "diagnostics_from_weights",
    "get_split",
    "gramian_weighting",
    "group_objectives",
    "split_from_config",
    "split_names",
    "validate_aggregator",
    "validate_split",
]
