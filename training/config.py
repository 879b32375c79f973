"""The typed training configuration: Hydra composes YAML, this module validates it before any compute.

Names follow the reference TRM code where its users know them (``data_paths``, ``global_batch_size``,
``epochs``, ``eval_interval``, ``lr``, ``puzzle_emb_lr``, ``ema``, ``arch.*``); JD lives under ``jd.*``.
"""

from __future__ import annotations

import math
import os
from typing import Annotated, Any, Literal

from omegaconf import DictConfig, OmegaConf
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from jd.config import JDConfig
from models.recursive_reasoning.config import ArchConfig

EVALUATOR_NAMES = ("exact", "arc")
DEMO_DATA_PATH = "data/demo-sudoku-4x4"


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the key, the value and what is accepted."""


class EvaluatorConfig(BaseModel):
    """One evaluator: ``name`` picks the class from the project's registry; the rest are its arguments."""

    model_config = ConfigDict(extra="forbid")

    name: Literal["exact", "arc"]
    pass_ks: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [1, 2, 5, 10], min_length=1)
    submission_k: int = Field(default=2, ge=1)


class WandbConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: Literal["offline", "online", "disabled"] = "offline"
    entity: str | None = None
    project: str | None = None  # defaults to project_name
    group: str | None = None
    tags: list[str] = Field(default_factory=list)


class TrainConfig(BaseModel):
    """Everything a run needs, validated, with every setting's default (the only place defaults are written:
    ``config/cfg_pretrain.yaml`` composes :func:`hydra_defaults` first and adds the demo's choices)."""

    model_config = ConfigDict(extra="forbid")

    arch: ArchConfig = Field(default_factory=ArchConfig)
    jd: JDConfig = Field(default_factory=JDConfig)

    # Data
    data_paths: list[str] = Field(min_length=1)
    data_paths_test: list[str] = Field(default_factory=list)
    evaluators: list[EvaluatorConfig] = Field(default_factory=lambda: [EvaluatorConfig(name="exact")])

    # Schedule
    global_batch_size: int = Field(ge=1)
    grad_accum_steps: int = Field(default=1, ge=1)
    epochs: int = Field(ge=1)
    eval_interval: int | None = Field(default=None, ge=1, description="epochs between evaluations; None = only at the end")
    min_eval_interval: int = Field(default=0, ge=0)
    eval_steps: list[Annotated[int, Field(ge=1)]] = Field(default_factory=list)  # extra evaluations at these optimizer steps
    eval_max_batches: int | None = Field(default=None, ge=1)
    eval_depths: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=list, description="also log eval/exact_accuracy@K (and @K/q, halting by the Q-head) for these step budgets"
    )
    eval_depths_every: int = Field(default=1, ge=1, description="the eval_depths curve at every N-th evaluation")
    max_steps: int | None = Field(default=None, ge=1)

    # Optimisation
    lr: float = Field(gt=0)
    lr_min_ratio: float = Field(default=1.0, ge=0, le=1)
    lr_warmup_steps: int = Field(default=0, ge=0)
    beta1: float = Field(default=0.9, ge=0, lt=1)
    beta2: float = Field(default=0.95, ge=0, lt=1)
    weight_decay: float = Field(default=0.1, ge=0)
    puzzle_emb_lr: float = Field(default=1e-2, ge=0)
    puzzle_emb_weight_decay: float = Field(default=0.1, ge=0)
    grad_clip_norm: float | None = Field(default=None, gt=0)
    ema: bool = False
    ema_rate: float = Field(default=0.999, gt=0, lt=1)
    freeze_weights: bool = Field(default=False, description="train the puzzle embeddings only (the JD study's option)")
    custom_sampling: bool = Field(default=False, description="hard-example sampling within groups (the JD study's rule; on there)")
    custom_sampling_rule: Literal["halted", "study"] = Field(
        default="halted",
        description="halted: count halted samples by their own identifier; study: the JD study's counting over the incoming "
        "batch and lookup by puzzle index, defects included (README)",
    )

    # Run
    seed: int = Field(default=0, ge=0)
    project_name: str | None = None
    run_name: str | None = None
    runs_root: str = "runs"
    run_dir: str | None = None
    load_checkpoint: str | None = None
    init_from: str | None = Field(
        default=None, description="start a new run from these weights only (a run, checkpoint or reference TRM step_N): fine-tuning"
    )
    resume: bool = False
    checkpoint_every_eval: bool = True
    checkpoint_interval: int | None = Field(default=None, ge=1, description="also checkpoint every N optimizer steps")
    keep_last: int = Field(default=3, ge=1)
    checkpoint_best: str | bool = Field(
        default=True,
        description="keep the best checkpoint by this held-out metric (true: the objective; false: none) as checkpoints/best.pt",
    )
    checkpoint_best_mode: Literal["auto", "max", "min"] = Field(default="auto", description="auto: min for a loss, max otherwise")
    checkpoint_best_raw: bool = Field(default=True, description="with ema=true, also evaluate the live weights and keep their best")
    max_nonfinite_steps: int = Field(default=20, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compile: Literal["auto", "true", "false", "regional"] | bool = Field(
        default="auto",
        description="torch.compile: on CUDA by default; false to disable (or DISABLE_COMPILE=1); "
        "regional: compile only the repeated reasoning module, once, instead of the whole unrolled recursion",
    )
    log_interval: int = Field(default=1, ge=1)
    threads: int | None = Field(default=None, ge=1, description="torch CPU threads; null: the cores this process may use (README)")
    prefetch_batches: int | None = Field(
        default=None, ge=0, description="batches read ahead by a background thread (pinned, copied on a side stream); null: 2 on CUDA, 0 on CPU"
    )
    progress_bar: bool = True
    wandb: WandbConfig = Field(default_factory=WandbConfig)
    objective: str = Field(
        default="eval/exact_accuracy",
        description="the final evaluation's metric a run returns to a Hydra sweeper (e.g. ARC/pass@2); NaN when absent",
    )

    @field_validator("run_name", "project_name")
    @classmethod
    def _plain_name(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or value in (".", "..") or "/" in value or "\\" in value):
            raise ValueError("must be a plain folder name (no '/', not '.' or '..'); use run_dir=PATH for a full path")
        return value

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.init_from and self.load_checkpoint:
            raise ValueError(
                "give init_from (a new run from a checkpoint's weights) or load_checkpoint (continue or restore a full training state), not both"
            )
        if self.jd.split == "none" and self.jd.n_groups is not None:
            raise ValueError("jd.n_groups groups JD objectives; it has no meaning with jd.split=none")
        bad = [key for key, value in _flatten(self.model_dump()) if isinstance(value, float) and not math.isfinite(value)]
        if bad:
            raise ValueError(f"{', '.join(bad)}: must be a finite number (got inf or nan)")
        return self

    @property
    def eval_paths(self) -> list[str]:
        return self.data_paths_test or self.data_paths

    def compile_enabled(self, device_type: str) -> bool:
        if isinstance(self.compile, bool):
            return self.compile
        if self.compile == "auto":
            return device_type == "cuda" and os.environ.get("DISABLE_COMPILE", "0") in ("", "0")
        return self.compile in ("true", "regional")

    @property
    def regional_compile(self) -> bool:
        """``compile=regional``: only the repeated region is compiled (:func:`models.registry.compile_core`)."""
        return self.compile == "regional"

    def compile_record(self, device_type: str) -> bool | str:
        """What the run's numerics record of compilation: ``False``, ``True`` (the whole core) or ``"regional"``."""
        if not self.compile_enabled(device_type):
            return False
        return "regional" if self.regional_compile else True

    def check_world(self, world_size: int) -> None:
        """Sizes that depend on the number of processes."""
        per_step = world_size * self.grad_accum_steps
        if self.global_batch_size % per_step:
            raise ConfigError(
                f"global_batch_size={self.global_batch_size} is not divisible by world_size x grad_accum_steps = "
                f"{world_size} x {self.grad_accum_steps}; choose a multiple of {per_step}"
            )


TRAJECTORY_NEUTRAL_KEYS = (
    "project_name",
    "run_name",
    "runs_root",
    "run_dir",
    "load_checkpoint",
    "resume",
    "checkpoint_every_eval",
    "checkpoint_interval",
    "keep_last",
    "checkpoint_best",
    "checkpoint_best_mode",
    "checkpoint_best_raw",
    "max_nonfinite_steps",
    "device",
    "compile",
    "log_interval",
    "threads",
    "prefetch_batches",
    "progress_bar",
    "wandb",
    "evaluators",
    "data_paths_test",
    "eval_max_batches",
    "eval_depths",
    "eval_depths_every",
    "min_eval_interval",
    "eval_steps",
    "jd.diagnostics",
    "objective",
)
"""Keys that do not change the training trajectory (where the run writes, what it logs or evaluates)."""


def trajectory_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every setting that changes the training trajectory between two configs
    (``model_dump(mode="json")`` dicts), e.g. a checkpoint's config and the config resuming it."""
    old_flat, new_flat = dict(_flatten(old)), dict(_flatten(new))
    changes = []
    for key in sorted(set(old_flat) | set(new_flat)):
        if any(key == neutral or key.startswith(neutral + ".") for neutral in TRAJECTORY_NEUTRAL_KEYS):
            continue
        if old_flat.get(key) != new_flat.get(key):
            changes.append(f"{key}: {old_flat.get(key)!r} -> {new_flat.get(key)!r}")
    return changes


def _flatten(data: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """``(dotted.key, value)`` for every leaf of nested dicts and lists."""
    if isinstance(data, dict):
        return [item for key, value in data.items() for item in _flatten(value, f"{prefix}{key}.")]
    if isinstance(data, list):
        return [item for index, value in enumerate(data) for item in _flatten(value, f"{prefix}{index}.")]
    return [(prefix.rstrip("."), data)]


def parse_config(raw: DictConfig | dict[str, Any]) -> TrainConfig:
    """Resolve interpolations and validate; raise :class:`ConfigError` with one line per problem."""
    container: Any = OmegaConf.to_container(raw, resolve=True) if isinstance(raw, DictConfig) else raw
    data = {key: value for key, value in dict(container).items() if key != "hydra"}
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_format_validation_error(error)) from None


def known_keys(model: type[BaseModel] | None = None, prefix: str = "") -> list[str]:
    """Every dotted config key ``TrainConfig`` accepts (``arch.hidden_size``, ``jd.split``, ...)."""
    model = model or TrainConfig
    keys = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        keys.append(prefix + name)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.extend(known_keys(annotation, f"{prefix}{name}."))
    return keys


def closest_key(key: str) -> str | None:
    """The accepted key most like ``key`` (a typo's likely intent), or ``None``."""
    import difflib

    matches = difflib.get_close_matches(key, known_keys(), n=1, cutoff=0.6)
    return matches[0] if matches else None


def unknown_key_message(key: str) -> str:
    """``KEY: unknown key; did you mean X?`` (or where the accepted keys are listed)."""
    guess = closest_key(key)
    hint = f"did you mean {guess}?" if guess else "python pretrain.py --cfg job prints every accepted key (python -m jd the jd.* values)"
    return f"{key}: unknown key; {hint}"


def _format_validation_error(error: ValidationError) -> str:
    lines = []
    for problem in error.errors():
        key = ".".join(str(part) for part in problem["loc"])
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "extra_forbidden":
            lines.append(unknown_key_message(key))
            continue
        value = problem.get("input")
        shown = "" if problem["type"] in ("missing", "extra_forbidden") or isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"{key}: {message}{shown}" if key else message)
    return "invalid config: " + "; ".join(lines)


HYDRA_DEFAULTS = "trm_jd_defaults"
"""The name ``config/cfg_pretrain.yaml`` lists first in its defaults: every setting's default, from this module."""


def hydra_defaults() -> dict[str, Any]:
    """Every setting's default as Hydra composes it, read from :class:`TrainConfig` (the one source of defaults):
    all but ``arch`` (its config group) and the settings without a default (the config file gives the demo's).
    Empty ``jd.*_kwargs`` are null, so that a command line can replace them with a dict.

    Example:
        >>> defaults = hydra_defaults()
        >>> defaults["keep_last"], defaults["jd"]["split"], "lr" in defaults
        (3, 'none', False)
    """
    values: dict[str, Any] = {}
    for name, field in TrainConfig.model_fields.items():
        if name == "arch" or field.is_required():
            continue
        default = field.get_default(call_default_factory=True)
        if isinstance(default, BaseModel):
            default = default.model_dump(mode="json")
        elif isinstance(default, list):
            default = [item.model_dump(mode="json") if isinstance(item, BaseModel) else item for item in default]
        values[name] = default
    values["jd"]["aggregator_kwargs"] = values["jd"]["scalarizer_kwargs"] = None
    return values


def register_hydra_defaults() -> None:
    """Make :func:`hydra_defaults` available to Hydra as :data:`HYDRA_DEFAULTS` (call before composing a config)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=HYDRA_DEFAULTS, node=hydra_defaults())
