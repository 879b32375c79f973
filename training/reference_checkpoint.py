"""Checkpoints of the reference TRM code (its TRM and HRM, and the JD study's fork), read and written.

The reference ``pretrain.py`` saves ``checkpoint_path/step_N``: a bare ``torch.save`` of the
loss-head-wrapped model's ``state_dict`` (keys ``model.inner.*``, prefixed ``_orig_mod.`` when the
model was compiled, the default there), and, when the run logged to W&B, ``all_config.yaml`` beside it
(the whole run config, ``yaml.dump`` of its ``PretrainConfig``). This module

* maps such weights onto this toolkit's models by name (:func:`map_reference_state`; anything that
  does not map is refused, naming the keys) and back (:func:`to_reference_state`);
* turns ``all_config.yaml`` (or, when it is absent, what the weights and the user's ``--set`` overrides
  say, then the reference's own defaults) into this toolkit's config, recording where every
  architecture value came from (:func:`reference_train_config`);
* writes a run's weights and config in the reference format (:func:`write_reference_checkpoint`).

Loading stays safe: ``torch.load(..., weights_only=True)`` (:func:`training.checkpoint.read_state`).

Example (the key mapping):
    >>> import torch
    >>> mapped, ignored = map_reference_state({"_orig_mod.model.inner.embed_tokens.embedding_weight": torch.zeros(3, 2)}, "x")
    >>> list(mapped), ignored
    (['embed_tokens.weight'], [])
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from dataset.atomic import atomic_open, atomic_write_text, write_failure
from dataset.common import DatasetError, read_metadata
from training.errors import CheckpointError

REFERENCE_ARCHS: dict[str, str] = {
    "recursive_reasoning.trm@TinyRecursiveReasoningModel_ACTV1": "trm",
    "recursive_reasoning.hrm@HierarchicalReasoningModel_ACTV1": "hrm",
    "recursive_reasoning.trmjd@TinyRecursiveReasoningModelJD_V1": "trm",
}
"""Reference ``arch.name`` -> this toolkit's ``arch.name`` (the JD fork's ``trmjd`` is the TRM's network)."""
EXPORT_ARCHS = {"trm": "recursive_reasoning.trm@TinyRecursiveReasoningModel_ACTV1", "hrm": "recursive_reasoning.hrm@HierarchicalReasoningModel_ACTV1"}

ARCH_FIELDS = (
    "H_cycles",
    "L_cycles",
    "H_layers",
    "L_layers",
    "hidden_size",
    "num_heads",
    "expansion",
    "puzzle_emb_ndim",
    "puzzle_emb_len",
    "pos_encodings",
    "rope_theta",
    "rms_norm_eps",
    "mlp_t",
    "halt_max_steps",
    "halt_exploration_prob",
    "no_ACT_continue",
    "forward_dtype",
    "dropout",
    "no_act",
)
"""``arch.*`` keys with the same name and meaning in both code bases."""
TOP_FIELDS = (
    "data_paths",
    "data_paths_test",
    "global_batch_size",
    "epochs",
    "eval_interval",
    "lr",
    "lr_min_ratio",
    "lr_warmup_steps",
    "beta1",
    "beta2",
    "weight_decay",
    "puzzle_emb_lr",
    "puzzle_emb_weight_decay",
    "ema",
    "ema_rate",
    "seed",
)
"""Top-level keys with the same name and meaning in both code bases."""

REFERENCE_DEFAULTS: dict[str, dict[str, Any]] = {
    "trm": {
        "H_cycles": 3,
        "L_cycles": 6,
        "num_heads": 8,
        "expansion": 4.0,
        "puzzle_emb_len": 16,
        "halt_max_steps": 16,
        "halt_exploration_prob": 0.1,
        "no_ACT_continue": True,
        "pos_encodings": "rope",
    },
    "hrm": {
        "H_cycles": 2,
        "L_cycles": 2,
        "num_heads": 8,
        "expansion": 4.0,
        "halt_max_steps": 16,
        "halt_exploration_prob": 0.1,
        "pos_encodings": "rope",
    },
}
"""The reference's ``config/arch/{trm,hrm}.yaml`` values for what neither ``all_config.yaml`` nor the weights tell."""
TOP_DEFAULTS: dict[str, Any] = {"global_batch_size": 768, "epochs": 100000, "lr": 1e-4, "lr_warmup_steps": 2000}
"""The reference's ``cfg_pretrain.yaml`` values, used when ``all_config.yaml`` is absent."""

_OWN_NAMES = {
    "embed_tokens.embedding_weight": "embed_tokens.weight",
    "embed_pos.embedding_weight": "embed_pos.weight",
    "puzzle_emb.weights": "puzzle_embedding.weights",
}
_CORE_PREFIXES = ("lm_head.", "q_head.", "L_level.", "H_level.")
_IGNORED = ("puzzle_emb.local_weights", "puzzle_emb.local_ids", "output_logits_init")
"""Reference tensors with no counterpart: the sparse embedding's per-batch scratch buffers and the JD
fork's initial logits for its differential loss (this toolkit starts that from zeros)."""
_STEP = re.compile(r"^step_(\d+)$")


@dataclass
class ReferenceCheckpoint:
    """A reference checkpoint read and mapped: weights under this toolkit's names, and its config."""

    path: Path
    step: int
    model_state: dict[str, Tensor]
    config: dict[str, Any]  # a raw TrainConfig dict (validate with training.config.parse_config)
    sources: dict[str, str]  # "arch.hidden_size" -> "all_config.yaml" | "weights" | "--set" | "reference default"
    notes: list[str] = field(default_factory=list)


def is_reference_state(state: Any) -> bool:
    """Whether a loaded object is a bare reference ``state_dict`` (tensors under ``[_orig_mod.]model.inner.``)."""
    return (
        isinstance(state, dict)
        and bool(state)
        and all(isinstance(value, Tensor) for value in state.values())
        and any(str(key).removeprefix("_orig_mod.").startswith("model.inner.") for key in state)
    )


def reference_steps(folder: Path) -> list[Path]:
    """The ``step_N`` files of a reference ``checkpoint_path`` folder, oldest first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_file() and (m := _STEP.match(p.name))]
    return [p for _, p in sorted(found)]


def step_of(path: Path) -> int:
    match = _STEP.match(path.name)
    return int(match.group(1)) if match else 0


def map_reference_state(state: dict[str, Tensor], source: Path | str) -> tuple[dict[str, Tensor], list[str]]:
    """Reference keys -> this toolkit's keys. Returns ``(mapped, ignored)``; raises :class:`CheckpointError`
    naming every key that has no counterpart here."""
    mapped: dict[str, Tensor] = {}
    ignored: list[str] = []
    unmapped: list[str] = []
    for key, value in state.items():
        name = key.removeprefix("_orig_mod.")
        if not name.startswith("model.inner."):
            unmapped.append(key)
            continue
        name = name.removeprefix("model.inner.")
        if name in _IGNORED:
            ignored.append(key)
        elif name in _OWN_NAMES:
            mapped[_OWN_NAMES[name]] = value
        elif name in ("H_init", "L_init"):
            mapped[name] = value
        elif name.startswith(_CORE_PREFIXES):
            mapped["core." + name] = value
        else:
            unmapped.append(key)
    if unmapped:
        raise CheckpointError(
            f"{source}: reference weights with no counterpart in this toolkit's TRM/HRM: {unmapped[:6]}"
            f"{f' and {len(unmapped) - 6} more' if len(unmapped) > 6 else ''}"
        )
    return mapped, ignored


def to_reference_state(state: dict[str, Tensor], compiled: bool = True) -> dict[str, Tensor]:
    """This toolkit's model ``state_dict`` -> the reference's keys (``_orig_mod.`` first when ``compiled``,
    what the reference's loader expects of a compiled model, its default)."""
    inverse = {own: reference for reference, own in _OWN_NAMES.items()}
    prefix = ("_orig_mod." if compiled else "") + "model.inner."
    out = {}
    for key, value in state.items():
        key = key.removeprefix("_orig_mod.")
        name = inverse.get(key) or (key.removeprefix("core.") if key.startswith("core.") else key)
        out[prefix + name] = value.detach().cpu().contiguous()
    return out


# --------------------------------------------------------------------------------------------- config
def _from_weights(state: dict[str, Tensor]) -> dict[str, Any]:
    """Architecture values the mapped weights determine."""
    found: dict[str, Any] = {"name": "hrm" if any(k.startswith("core.H_level.") for k in state) else "trm"}
    if "embed_tokens.weight" in state:
        found["hidden_size"] = int(state["embed_tokens.weight"].shape[1])
    found["puzzle_emb_ndim"] = int(state["puzzle_embedding.weights"].shape[1]) if "puzzle_embedding.weights" in state else 0
    for level, key in (("L_level", "L_layers"), ("H_level", "H_layers")):
        layers = {int(k.split(".")[3]) for k in state if k.startswith(f"core.{level}.layers.")}
        if layers:
            found[key] = max(layers) + 1
    found["mlp_t"] = any(".mlp_t." in k for k in state)
    if "embed_pos.weight" in state:
        found["pos_encodings"] = "learned"
    return found


class _ConfigLoader(yaml.SafeLoader):
    """A safe YAML loader that reads the JD fork's ``!!python/object/apply:...Enum [value]`` tags (its
    ``yaml.dump`` of enums) as their plain values, never constructing Python objects."""


def _plain_python_tag(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> Any:
    if isinstance(node, yaml.SequenceNode):
        values = loader.construct_sequence(node, deep=True)
        return values[0] if len(values) == 1 else values
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    return loader.construct_scalar(node)


_ConfigLoader.add_multi_constructor("tag:yaml.org,2002:python/", _plain_python_tag)


def _read_all_config(path: Path) -> dict[str, Any] | None:
    config_file = path.parent / "all_config.yaml"
    if not config_file.is_file():
        return None
    try:
        data = yaml.load(config_file.read_text(), Loader=_ConfigLoader)  # noqa: S506 - a SafeLoader subclass
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{config_file}: not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("arch"), dict):
        raise CheckpointError(f"{config_file}: expected the reference run config (a mapping with 'arch')")
    if not isinstance(data["arch"].get("loss") or {}, dict):
        raise CheckpointError(f"{config_file}: arch.loss is {data['arch']['loss']!r}; the reference writes a mapping (name, loss_type)")
    if not isinstance(data.get("evaluators") or [], list) or not all(isinstance(e, dict) for e in data.get("evaluators") or []):
        raise CheckpointError(f"{config_file}: evaluators is {data['evaluators']!r}; the reference writes a list of mappings (name: ...)")
    return data


def _set_dotted(target: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    for part in parts[:-1]:
        target = target.setdefault(part, {})
    target[parts[-1]] = value


class _Sourced:
    """The config being assembled (``arch`` and top-level keys) and where each value came from."""

    def __init__(self) -> None:
        self.arch: dict[str, Any] = {}
        self.top: dict[str, Any] = {}
        self.sources: dict[str, str] = {}

    def put_arch(self, key: str, value: Any, source: str) -> None:
        self.arch[key] = value
        self.sources["arch." + key] = source

    def put_top(self, key: str, value: Any, source: str) -> None:
        self.top[key] = value
        self.sources[key] = source


def reference_train_config(
    path: Path, weights: dict[str, Tensor], overrides: dict[str, Any] | None = None, data_paths: list[str] | None = None
) -> tuple[dict[str, Any], dict[str, str], list[str]]:
    """This toolkit's raw config for a reference checkpoint: ``(config, sources, notes)``.

    Precedence: ``overrides`` (dotted keys of this toolkit's config, e.g. ``{"arch.num_heads": 8}``) >
    ``all_config.yaml`` beside the checkpoint > what the weights determine (``weights``, already mapped)
    > the reference's defaults. ``data_paths`` (when given) replaces the config's data.
    """
    reference = _read_all_config(path)
    notes: list[str] = []
    built = _Sourced()
    if reference is not None:
        _take_all_config(built, reference, path, notes)
    for key, value in _from_weights(weights).items():
        if key not in built.arch:
            built.put_arch(key, value, "weights")
    for key, value in REFERENCE_DEFAULTS[built.arch["name"]].items():
        if key not in built.arch:
            built.put_arch(key, value, "reference default")
    _adapt_arch(built)
    _take_data(built, path, data_paths)
    _puzzle_prefix_from_widths(built, weights)
    config: dict[str, Any] = {**built.top, "arch": built.arch}
    for key, value in (overrides or {}).items():
        _set_dotted(config, key, value)
        built.sources[key] = "--set"
    if reference is None:
        notes.append(
            f"{path.parent / 'all_config.yaml'} is missing: the architecture comes from the weights and the reference's defaults "
            "(check H_cycles, L_cycles, num_heads, halt_max_steps and puzzle_emb_len below: with RoPE attention no weight shape "
            "tells them (mlp_t and learned positions tell puzzle_emb_len), and a wrong one scores near 0; correct them with "
            "--set arch.KEY=VALUE)"
        )
    return config, built.sources, notes


def _sequence_width(weights: dict[str, Tensor]) -> int | None:
    """The full sequence length (puzzle prefix + the data's tokens) a TRM's weights were built for, when a shape
    holds it: the token-mixing MLP of ``mlp_t`` blocks, or learned positions; ``None`` with RoPE attention."""
    for key, value in weights.items():
        if key.endswith(".mlp_t.gate_up_proj.weight"):
            return int(value.shape[1])
    return int(weights["embed_pos.weight"].shape[0]) if "embed_pos.weight" in weights else None


def _puzzle_prefix_from_widths(built: _Sourced, weights: dict[str, Tensor]) -> None:
    """``puzzle_emb_len`` = that width minus the data's ``seq_len``, unless ``all_config.yaml`` gave it (a wrong
    prefix length scores near 0, so a shape that tells it wins over the reference's default)."""
    width = _sequence_width(weights)
    if width is None or built.arch.get("name") != "trm" or built.sources.get("arch.puzzle_emb_len", "").startswith("all_config"):
        return
    try:
        seq_len = read_metadata(built.top["data_paths"][0]).seq_len
    except (DatasetError, KeyError, IndexError, TypeError):
        return  # no data to measure against: the dataset checks report it
    if width > seq_len:
        built.put_arch("puzzle_emb_len", width - seq_len, f"weights (sequence width {width} - the data's seq_len {seq_len})")


def _take_all_config(built: _Sourced, reference: dict[str, Any], path: Path, notes: list[str]) -> None:
    """The architecture and top-level settings ``all_config.yaml`` names (unknown arch keys noted)."""
    ref_arch = reference["arch"]
    name = str(ref_arch.get("name", ""))
    if name not in REFERENCE_ARCHS:
        raise CheckpointError(f"{path.parent / 'all_config.yaml'}: arch.name={name!r} has no counterpart here; accepted: {sorted(REFERENCE_ARCHS)}")
    built.put_arch("name", REFERENCE_ARCHS[name], "all_config.yaml")
    loss = ref_arch.get("loss") or {}
    if "loss_type" in loss:
        built.put_arch("loss_type", loss["loss_type"], "all_config.yaml")
    for key in ARCH_FIELDS:
        if key in ref_arch:
            built.put_arch(key, ref_arch[key], "all_config.yaml")
    unknown = sorted(set(ref_arch) - set(ARCH_FIELDS) - {"name", "loss"})
    if unknown:
        notes.append(f"all_config.yaml arch keys with no counterpart here, ignored: {', '.join(f'{k}={ref_arch[k]!r}' for k in unknown)}")
    for key in TOP_FIELDS:
        if reference.get(key) is not None:
            built.put_top(key, reference[key], "all_config.yaml")
    evaluators = [e.get("name", "") for e in reference.get("evaluators") or [] if isinstance(e, dict)]
    if any(name.split("@")[0] == "arc" for name in evaluators):
        built.top["wants_arc"] = True


def _adapt_arch(built: _Sourced) -> None:
    """Where the reference's settings mean something else here: HRM's fixed prefix and Q-continue, mlp_t without
    RoPE, bfloat16 on CPU."""
    arch, sources = built.arch, built.sources
    if arch["name"] == "hrm":
        # The reference HRM always trains its Q-continue head and sizes the puzzle prefix by ceil(ndim / hidden).
        arch.setdefault("no_ACT_continue", False)
        sources.setdefault("arch.no_ACT_continue", "reference HRM (always Q-continue)")
        built.put_arch("puzzle_emb_len", 0, "reference HRM (ceil(puzzle_emb_ndim / hidden_size))")
    if arch.get("mlp_t") and arch.get("pos_encodings") == "rope":
        built.put_arch("pos_encodings", "none", f"{sources['arch.pos_encodings']} (rope -> none: the reference's mlp_t blocks never apply RoPE)")
    if arch.get("forward_dtype") == "bfloat16":
        built.put_arch("forward_dtype", "auto", f"{sources['arch.forward_dtype']} (bfloat16 -> auto: bfloat16 on CUDA, float32 on CPU)")


def _take_data(built: _Sourced, path: Path, data_paths: list[str] | None) -> None:
    """The reference's top-level defaults, the data (``--data`` wins) and the evaluators the data allows."""
    top = built.top
    for key, value in TOP_DEFAULTS.items():
        if key not in top:
            built.put_top(key, value, "reference default")
    if data_paths:
        built.put_top("data_paths", list(data_paths), "--data")
        top.pop("data_paths_test", None)
    elif "data_paths" not in top:
        raise CheckpointError(f"{path}: no all_config.yaml beside it names the data; give the dataset folder (--data PATH)")
    if top.pop("wants_arc", False):  # the reference's default config names the ARC evaluator even for Sudoku runs
        eval_data = (top.get("data_paths_test") or top["data_paths"])[0]
        is_arc = Path(eval_data).is_dir() and read_metadata(eval_data).kind == "arc"
        built.put_top("evaluators", [{"name": "exact"}, *([{"name": "arc"}] if is_arc else [])], "all_config.yaml (arc@ARC on ARC data only)")


def read_reference_checkpoint(
    path: Path, state: dict[str, Tensor], *, overrides: dict[str, Any] | None = None, data_paths: list[str] | None = None
) -> ReferenceCheckpoint:
    """Map a loaded reference ``state`` (see :func:`training.checkpoint.read_state`) and build its config."""
    mapped, ignored = map_reference_state(state, path)
    config, sources, notes = reference_train_config(path, mapped, overrides, data_paths)
    if ignored:
        notes.append(f"reference tensors with no counterpart here, not loaded: {', '.join(ignored)}")
    if "core.q_head.weight" not in mapped and "embed_tokens.weight" in mapped and not config["arch"].get("no_act", False):
        # The JD fork's no_act variant has no Q-head: give it the TRM's initial one (zero weights, bias -5:
        # never halts before halt_max_steps, which is how that variant ran).
        hidden, dtype = mapped["embed_tokens.weight"].shape[1], mapped["embed_tokens.weight"].dtype
        mapped["core.q_head.weight"] = torch.zeros(2, hidden, dtype=dtype)
        mapped["core.q_head.bias"] = torch.full((2,), -5.0, dtype=dtype)
        notes.append("the checkpoint has no Q-head (the JD fork's no_act): the TRM's initial Q-head is used (never halts early)")
    return ReferenceCheckpoint(path, step_of(path), mapped, config, sources, notes)


def describe_sources(checkpoint: ReferenceCheckpoint) -> str:
    """One line per architecture value and where it came from, for the user to check."""
    lines = []
    for key in sorted(checkpoint.sources):
        if key.startswith("arch.") or key in ("data_paths", "global_batch_size"):
            section = checkpoint.config["arch"] if key.startswith("arch.") else checkpoint.config
            value = section.get(key.removeprefix("arch."), checkpoint.config.get(key))
            lines.append(f"  {key} = {value!r}  ({checkpoint.sources[key]})")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- export
def reference_all_config(config: dict[str, Any]) -> dict[str, Any]:
    """A reference ``all_config.yaml`` for this toolkit's run config (``TrainConfig.model_dump(mode="json")``)."""
    arch = config["arch"]
    if arch["name"] not in EXPORT_ARCHS:
        raise CheckpointError(f"arch.name={arch['name']!r} has no reference counterpart; exportable: {sorted(EXPORT_ARCHS)}")
    puzzle_emb_len = arch["puzzle_emb_len"] or -(-arch["puzzle_emb_ndim"] // arch["hidden_size"])
    ref_arch: dict[str, Any] = {
        "name": EXPORT_ARCHS[arch["name"]],
        "loss": {"name": "losses@ACTLossHead", "loss_type": arch["loss_type"]},
        **{key: arch[key] for key in ARCH_FIELDS if key in arch and key not in ("dropout", "puzzle_emb_len", "no_ACT_continue", "no_act")},
    }
    if arch.get("no_act"):  # the JD fork's trmjd: no Q-head, its NoACT loss head
        ref_arch.update(
            name="recursive_reasoning.trmjd@TinyRecursiveReasoningModelJD_V1",
            no_act=True,
            loss={"name": "losses@NoACTLossHead", "loss_type": arch["loss_type"], "differential_loss": False},
        )
    ref_arch["forward_dtype"] = "bfloat16" if arch["forward_dtype"] == "auto" else arch["forward_dtype"]
    if arch["name"] == "trm":
        ref_arch["puzzle_emb_len"] = puzzle_emb_len
        ref_arch["no_ACT_continue"] = arch["no_ACT_continue"]
    evaluators = [{"name": "arc@ARC"} for e in config.get("evaluators", []) if e.get("name") == "arc"]
    top = {key: config[key] for key in TOP_FIELDS if key in config}
    return {
        **top,
        "arch": ref_arch,
        "evaluators": evaluators,
        "eval_save_outputs": [],
        "freeze_weights": False,
        "checkpoint_every_eval": True,
        "min_eval_interval": 0,
        "load_checkpoint": None,
        "project_name": None,
        "run_name": None,
        "checkpoint_path": None,
    }


def write_reference_checkpoint(state: dict[str, Tensor], config: dict[str, Any], out_dir: Path, step: int, compiled: bool = True) -> Path:
    """Write ``out_dir/step_N`` and ``out_dir/all_config.yaml`` (refusing to replace existing files)."""

    target = out_dir / f"step_{step}"
    config_file = out_dir / "all_config.yaml"
    existing = [str(p) for p in (target, config_file) if p.exists()]
    if existing:
        raise CheckpointError(f"{existing} already exist; choose another output folder")

    created = not out_dir.exists()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with atomic_open(target, "wb") as handle:
            torch.save(to_reference_state(state, compiled=compiled), handle)
        atomic_write_text(config_file, yaml.safe_dump(reference_all_config(config), sort_keys=True))
    except (OSError, RuntimeError) as error:  # RuntimeError: torch's "unexpected pos" on a full disk
        target.unlink(missing_ok=True)
        if created and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()  # no empty folder left behind
        where = out_dir if out_dir.exists() else out_dir.parent
        raise CheckpointError(f"cannot write the export into {out_dir}: {write_failure(where, error)}; nothing was left") from None
    return target
