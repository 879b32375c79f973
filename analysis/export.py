"""Export a checkpoint's weights: in the reference TRM code's format, or as safetensors for the Hugging Face Hub.

    python -m analysis.export runs/arc1/a1 exported/a1                 # best checkpoint (else newest), EMA weights if kept
    python -m analysis.export runs/arc1/a1/checkpoints/step_00010000.pt exported/a1-10k --no-ema
    python -m analysis.export RUN OUT --no-compile-prefix              # keys for a reference run with DISABLE_COMPILE=1
    python -m analysis.export RUN OUT --format safetensors             # model.safetensors, config.json, README.md
    python -m analysis.export RUN OUT --format safetensors --push-to-hub alice/trm-sudoku   # and upload OUT

``--format reference`` (the default) writes ``OUT/step_N``, a bare ``state_dict`` of the reference's
loss-head-wrapped model (``model.inner.*``), prefixed ``_orig_mod.`` by default as the reference's
``load_checkpoint`` expects of a compiled model, and ``OUT/all_config.yaml``, the run's config in the
reference's names, so the reference's scripts take the model as it is. TRM and HRM export; the
transformer baseline has no reference counterpart.

``--format safetensors`` writes ``OUT/model.safetensors`` (this toolkit's names, no pickle),
``OUT/config.json`` (config, dataset sizes, step, which weights) and ``OUT/README.md``, a model card
with the checkpoint's logged held-out metrics and the command that trained it. ``hf://OWNER/REPO`` then
loads it anywhere a checkpoint is accepted (:mod:`training.hub`). ``--push-to-hub REPO`` uploads the
folder with ``huggingface_hub`` (a token from ``hf auth login`` or ``HF_TOKEN``; needs network).

Existing files are never replaced.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from analysis.evaluate import USER_ERRORS, EvalInputError, LoadedCheckpoint, model_from_checkpoint, read_checkpoint
from dataset.atomic import atomic_write_text
from training.checkpoint import CheckpointError
from training.config import TrainConfig
from training.reference_checkpoint import write_reference_checkpoint
from training.safetensors_checkpoint import CONFIG_FILE, WEIGHTS_FILE, write_safetensors

FORMATS = ("reference", "safetensors")
CARD_FILE = "README.md"


def export(checkpoint: str, out_dir: str, *, use_ema: bool | None = None, compiled: bool = True, fmt: str = "reference") -> Path:
    """Write ``checkpoint`` (a run or checkpoint of this toolkit) in ``fmt``; return the weights file's path."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise EvalInputError(f"{out_dir} is a file; give a folder for the exported files")
    path, state, config, sizes = read_checkpoint(checkpoint)
    if "format" not in state:
        raise EvalInputError(f"{path} is already a reference checkpoint; nothing to export")
    if fmt == "safetensors":
        taken = [name for name in (WEIGHTS_FILE, CONFIG_FILE, CARD_FILE) if (out / name).exists()]
        if taken:
            raise EvalInputError(f"{out_dir} already holds {taken}; choose another output folder")
    loaded = model_from_checkpoint(path, state, config, sizes, device=torch.device("cpu"), use_ema=use_ema)
    weights = "EMA" if loaded.uses_ema else "live"
    if fmt == "reference":
        target = write_reference_checkpoint(loaded.model.state_dict(), config.model_dump(mode="json"), out, loaded.step, compiled=compiled)
        print(f"Wrote {target} ({weights} weights of {path}) and {target.parent / 'all_config.yaml'}")
        return target
    return export_safetensors(loaded, state, out)


def export_safetensors(loaded: LoadedCheckpoint, state: dict[str, Any], out: Path) -> Path:
    """``model.safetensors``, ``config.json`` and the model card of ``loaded`` in ``out``."""
    metrics = logged_metrics(loaded.run_dir, loaded.step, loaded.uses_ema)
    record = {
        "config": loaded.config.model_dump(mode="json"),
        "data": {
            "seq_len": loaded.sizes.seq_len,
            "vocab_size": loaded.sizes.vocab_size,
            "num_puzzle_identifiers": loaded.sizes.num_puzzle_identifiers,
        },
        "step": loaded.step,
        "weights": "ema" if loaded.uses_ema else "live",
        "source": str(loaded.path),
        "metrics": metrics,
    }
    try:
        written = write_safetensors(out, loaded.model.state_dict(), record)
        atomic_write_text(out / CARD_FILE, model_card(loaded, metrics, reproducing_command(loaded.config)))
    except OSError as error:
        from dataset.atomic import write_failure

        raise CheckpointError(f"cannot write the export into {out}: {write_failure(out, error)}") from None
    print(f"Wrote {written[0]}, {written[1]} and {out / CARD_FILE} ({record['weights']} weights of {loaded.path}, step {loaded.step})")
    return written[0]


def logged_metrics(run_dir: Path, step: int, ema: bool) -> dict[str, float]:
    """The held-out metrics the run logged for ``step`` (those of the exported weights), ``{}`` when none are found."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    except OSError:
        return {}
    found: dict[str, float] = {}
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("step") == step and "eval/count" in record:
            found = {key: value for key, value in record.items() if key != "step"}
    if not ema and any(key.startswith("raw/") for key in found):  # the live weights of a run with EMA
        return {key.removeprefix("raw/"): value for key, value in found.items() if key.startswith("raw/")}
    return {key: value for key, value in found.items() if not key.startswith("raw/")}


LOCATION_KEYS = ("runs_root", "run_dir", "run_name", "project_name", "load_checkpoint", "resume", "progress_bar", "device", "wandb")
"""Settings that say where a run writes or how it shows itself, left out of a reproducing command."""


def reproducing_command(config: TrainConfig) -> str:
    """``python pretrain.py KEY=VALUE ...``: every setting of ``config`` that differs from ``config/cfg_pretrain.yaml``
    (where and how a run writes aside), so the command composes the same config."""
    from pretrain import compose_config

    ours, base = _leaves(config.model_dump(mode="json")), _leaves(compose_config([]).model_dump(mode="json"))
    overrides = [
        f"{key}={_hydra_value(value)}"
        for key, value in ours.items()
        if base.get(key, object()) != value and not any(key == k or key.startswith(k + ".") for k in LOCATION_KEYS)
    ]
    return " ".join(["python pretrain.py", *overrides])


def _leaves(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts flattened to dotted keys (lists stay whole values)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _hydra_value(value: Any) -> str:
    """A value in Hydra's override grammar (lists and dicts in flow style, strings quoted when they need it)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ",".join(_hydra_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{key}:{_hydra_value(item)}" for key, item in value.items()) + "}"
    text = str(value)
    plain = text and all(ch.isalnum() or ch in "._-/+" for ch in text)
    return text if plain else "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def model_card(loaded: LoadedCheckpoint, metrics: dict[str, float], command: str) -> str:
    """The exported folder's ``README.md``: what the model is, its held-out metrics, how it was trained and how to load it."""
    arch = loaded.config.arch
    lines = [
        "---",
        "library_name: trm-jd",
        "tags: [tiny-recursive-model, trm, jacobian-descent]",
        "---",
        f"# {arch.name.upper()} ({loaded.config.jd.split if loaded.config.jd.split != 'none' else 'gradient descent'}), step {loaded.step}",
        "",
        f"Trained with trm-jd on {', '.join(loaded.config.data_paths)}: hidden size {arch.hidden_size}, H_cycles {arch.H_cycles}, "
        f"L_cycles {arch.L_cycles}, up to {arch.halt_max_steps} supervision steps; {'EMA' if loaded.uses_ema else 'live'} weights.",
        "",
        "## Held-out metrics (as logged at this step)",
        "",
    ]
    shown = {key: value for key, value in sorted(metrics.items()) if key.startswith(("eval/", "ARC/")) and not key.endswith("count")}
    lines += ["| metric | value |", "|---|---:|"] + [f"| {key} | {value:.4f} |" for key, value in shown.items()] if shown else ["Not logged."]
    lines += [
        "",
        "## How it was trained",
        "",
        "The same settings, as a command (the dataset folders must exist):",
        "",
        f"```\n{command}\n```",
        "",
        "## Loading",
        "",
    ]
    lines += [
        "```",
        "python -m analysis.evaluate hf://OWNER/REPO            # its metrics on its held-out data",
        "python pretrain.py init_from=hf://OWNER/REPO ...        # fine-tune from these weights",
        "```",
        "",
        f"`{WEIGHTS_FILE}` holds the weights (no code), `{CONFIG_FILE}` the config and dataset sizes that rebuild the model.",
    ]
    return "\n".join(lines) + "\n"


def upload_plan(folder: Path) -> list[tuple[str, int]]:
    """What ``--push-to-hub`` uploads: every file of ``folder`` with its size; a pickle is refused (only safetensors go up)."""
    files = sorted(path for path in folder.rglob("*") if path.is_file())
    pickled = [path.name for path in files if path.suffix in (".pt", ".pth", ".bin", ".pkl") or path.name.startswith("step_")]
    if pickled:
        raise EvalInputError(f"{folder} holds pickled checkpoints {pickled}; push a --format safetensors export")
    return [(str(path.relative_to(folder)), path.stat().st_size) for path in files]


def push_to_hub(folder: Path, repo_id: str) -> str:
    """Create ``repo_id`` (if needed) and upload ``folder``; returns the repository's URL."""
    plan = upload_plan(folder)
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise EvalInputError("--push-to-hub needs huggingface_hub: pip install 'trm-jd[hub]'") from None
    print(f"Uploading {len(plan)} files ({sum(size for _, size in plan) / 1e6:.1f} MB) to {repo_id}: {[name for name, _ in plan]}", flush=True)
    try:
        api = HfApi()
        url = api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="trm-jd export")
    except Exception as error:  # noqa: BLE001 - offline, no token, no permission: the Hub client's many error types
        reason = str(error).strip().splitlines()[0][:240] if str(error).strip() else type(error).__name__
        raise EvalInputError(f"--push-to-hub {repo_id}: {type(error).__name__}: {reason}; the export in {folder} is kept") from None
    print(f"Pushed {folder} to {url}")
    return str(url)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (0, or 2 for bad input)."""
    parser = argparse.ArgumentParser(prog="python -m analysis.export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a run directory (its best checkpoint, else its newest), a checkpoint file, or hf://OWNER/REPO")
    parser.add_argument("out_dir", help="folder for the exported files (existing files are never replaced)")
    parser.add_argument("--format", choices=FORMATS, default="reference", help="reference: step_N + all_config.yaml; safetensors: for the Hub")
    parser.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None, help="export the EMA weights (default: when the run kept them)")
    parser.add_argument("--no-compile-prefix", action="store_true", help="reference format: keys without _orig_mod. (DISABLE_COMPILE=1 runs)")
    parser.add_argument("--push-to-hub", default=None, metavar="OWNER/REPO", help="upload the safetensors export to this Hub repository")
    args = parser.parse_args(argv)
    try:
        if args.push_to_hub and args.format != "safetensors":
            raise EvalInputError("--push-to-hub uploads safetensors exports only; add --format safetensors")
        export(args.checkpoint, args.out_dir, use_ema=args.ema, compiled=not args.no_compile_prefix, fmt=args.format)
        if args.push_to_hub:
            push_to_hub(Path(args.out_dir), args.push_to_hub)
        return 0
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
