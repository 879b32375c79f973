"""Evaluate a checkpoint without training.

    python -m analysis.evaluate runs/sudoku4/my-run                       # best checkpoint, its own eval data
    python -m analysis.evaluate runs/sudoku4/my-run --last                # its newest checkpoint
    python -m analysis.evaluate runs/arc1/run/checkpoints/step_00010000.pt --evaluators arc,exact
    python -m analysis.evaluate RUN --data data/other-sudoku --no-ema --max-batches all --out results/other
    python -m analysis.evaluate RUN --steps 1,2,4,8,16,32 --halt max,q   # accuracy against depth; depth.png
    python -m analysis.evaluate RUN --puzzle-ids true,blank,random       # does the model need the puzzle ID?
    torchrun --nproc-per-node 4 -m analysis.evaluate RUN

A reference TRM checkpoint (``checkpoint_path/step_N`` of the reference code, its HRM, or the JD study's
fork) evaluates the same way: its config comes from ``all_config.yaml`` beside it, else from the
weights, ``--set arch.KEY=VALUE`` and the reference's defaults; the command prints where every
architecture value came from (:mod:`training.reference_checkpoint`).

The model is rebuilt from the checkpoint's own configuration (validated as a
:class:`training.config.TrainConfig`) and sized by the dataset sizes stored with it; its weights are
loaded, the averaged (EMA) weights by default when the run kept them, exactly as the trainer does for
its evaluations. The test split of the chosen dataset(s) then runs through
:func:`training.evaluation.evaluate` with the trainer's defaults (batch size, ``eval_max_batches``,
evaluators), so the metrics equal the ones the trainer logged for the same checkpoint.

Results go to ``RUN_DIR/eval/standalone-step_N/metrics.json`` (a numbered suffix keeps earlier
results), or to ``--out DIR``, which must not already hold results unless ``--overwrite`` is given.
Evaluators may write there too (``submission.json`` for ARC). Bad input stops the command with one
line on stderr and exit status 2 before any compute starts.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from torch import Tensor

from analysis.depth import depth_table, halting_summary, plot_depth, summary_lines
from dataset.atomic import atomic_write_text
from dataset.common import DatasetError, DatasetMetadata, read_metadata
from dataset.puzzle_dataset import PuzzleDataset
from evaluators.depth import parse_depths, parse_halt_rules
from evaluators.puzzle_ids import IdentifierVariant, identifier_table, parse_identifier_variants
from models.losses import ACTLossHead
from models.recursive_reasoning.act import ACTModel
from models.registry import build_model
from training.checkpoint import BEST_NAME, BEST_RAW_NAME, CheckpointError, checked_state, read_state, resolve_weights
from training.config import EVALUATOR_NAMES, ConfigError, EvaluatorConfig, TrainConfig, parse_config
from training.distributed import DistInfo, setup_distributed, teardown_distributed
from training.evaluation import ExampleProgress, build_evaluators, evaluate, evaluate_depths
from training.reference_checkpoint import describe_sources, is_reference_state, read_reference_checkpoint

RESULT_FILES = ("metrics.json", "submission.json")
"""Files a standalone evaluation writes into its output folder (never overwritten without ``--overwrite``)."""


class EvalInputError(ValueError):
    """An argument or a file given to a standalone evaluation is wrong; the message says what is accepted."""


USER_ERRORS = (EvalInputError, CheckpointError, DatasetError, ConfigError)


@dataclass(frozen=True)
class DataSizes:
    """The dataset sizes a model was built for (stored in every checkpoint under ``data``)."""

    seq_len: int
    vocab_size: int
    num_puzzle_identifiers: int


@dataclass
class LoadedCheckpoint:
    """A model rebuilt from a checkpoint, in eval mode, with the weights chosen for evaluation."""

    path: Path
    step: int
    config: TrainConfig
    sizes: DataSizes
    model: ACTModel
    loss_head: ACTLossHead
    uses_ema: bool

    @property
    def run_dir(self) -> Path:
        return run_dir_of(self.path)


def run_dir_of(checkpoint: Path) -> Path:
    """The run directory a checkpoint belongs to (its folder when it lies outside ``checkpoints/``)."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


# ------------------------------------------------------------------------------------------ loading
def read_checkpoint(
    checkpoint_or_run: str | Path, *, overrides: dict[str, Any] | None = None, data_paths: list[str] | None = None, newest: bool = False
) -> tuple[Path, dict[str, Any], TrainConfig, DataSizes]:
    """Resolve a checkpoint file or run directory (or a reference ``step_N``) and read it on the CPU.

    A run directory gives its best checkpoint when it keeps one (``newest``: its newest step); which one
    is printed.

    Returns ``(path, state, config, sizes)``; raises :class:`CheckpointError` when the file is missing,
    unreadable, or lacks a valid config or dataset sizes. ``overrides`` (dotted config keys) and
    ``data_paths`` apply to reference checkpoints, whose config may be absent and whose data is elsewhere.
    """
    path = resolve_weights(checkpoint_or_run, newest=newest)
    raw = read_state(path)
    if is_reference_state(raw):
        return _read_reference(path, raw, overrides, data_paths)
    if overrides:
        raise EvalInputError(f"--set: {path} carries its own config; --set applies to reference checkpoints only")
    state = checked_state(raw, path)  # read once
    if not isinstance(state.get("config"), dict):
        raise CheckpointError(f"{path}: the checkpoint holds no training config, so the model cannot be rebuilt")
    if path.name in (BEST_NAME, BEST_RAW_NAME) and Path(checkpoint_or_run).is_dir():
        state = {**state, "chosen": f"{checkpoint_or_run}: its best checkpoint, {describe_best(path, state)} (--last: its newest)"}
    try:
        config = parse_config(state["config"])
    except ConfigError as error:
        raise CheckpointError(f"{path}: its config does not validate with this version of the code ({error})") from None
    data = state.get("data")
    try:
        sizes = DataSizes(int(data["seq_len"]), int(data["vocab_size"]), int(data["num_puzzle_identifiers"]))  # type: ignore[index]  # a bad value raises below
    except (TypeError, KeyError, ValueError):
        raise CheckpointError(f"{path}: the checkpoint lacks its dataset sizes ('data' with seq_len, vocab_size, num_puzzle_identifiers)") from None
    return path, state, config, sizes


def describe_best(path: Path, state: dict[str, Any]) -> str:
    """``best.pt (step 120, eval/exact_accuracy = 0.91, EMA weights)``, from the record the checkpoint holds."""
    best: dict[str, Any] = state["best"] if isinstance(state.get("best"), dict) else {}
    kind = "raw" if path.name == BEST_RAW_NAME else "ema" if state.get("ema") is not None else "weights"
    record = (best.get("records") or {}).get(kind) or {}
    weights = {"raw": ", live weights", "ema": ", EMA weights"}.get(kind, "")
    value = f", {best.get('metric')} = {record['value']:.6g}" if "value" in record else ""
    return f"{path.name} (step {int(state.get('step', 0))}{value}{weights})"


def _read_reference(
    path: Path, raw: dict[str, Tensor], overrides: dict[str, Any] | None, data_paths: list[str] | None
) -> tuple[Path, dict[str, Any], TrainConfig, DataSizes]:
    reference = read_reference_checkpoint(path, raw, overrides=overrides, data_paths=data_paths)
    try:
        config = parse_config(reference.config)
    except ConfigError as error:
        raise CheckpointError(f"{path}: the config read for it does not validate ({error}); correct it with --set KEY=VALUE") from None
    weights = reference.model_state
    seq_len = read_metadata(config.eval_paths[0]).seq_len  # not stored in the weights (RoPE): the data's
    puzzles = weights["puzzle_embedding.weights"].shape[0] if "puzzle_embedding.weights" in weights else 1
    sizes = DataSizes(seq_len, int(weights["embed_tokens.weight"].shape[0]), int(puzzles))
    # Printed once the model has loaded (model_from_checkpoint): a refusal stays the only line.
    report = "\n".join(
        [
            f"Reference checkpoint {path}: architecture and where each value came from\n{describe_sources(reference)}",
            *(f"note: {note}" for note in reference.notes),
        ]
    )
    return path, {"model": weights, "step": reference.step, "ema": None, "reference_report": report}, config, sizes


def parse_overrides(items: Sequence[str] | None) -> dict[str, Any]:
    """``["arch.num_heads=8", ...]`` -> ``{"arch.num_heads": 8}`` (values read as YAML)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise EvalInputError(f"--set {item!r}: expected KEY=VALUE with a dotted config key, e.g. arch.num_heads=8")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise EvalInputError(f"--set {item!r}: the value is not valid YAML") from None
    return out


def load_for_evaluation(checkpoint_or_run: str | Path, device: torch.device | str, use_ema: bool | None = None) -> LoadedCheckpoint:
    """Rebuild the checkpoint's model on ``device`` (``"cpu"``, ``"cuda"``, a ``torch.device``) in eval mode.

    ``use_ema``: ``None`` takes the averaged weights when the checkpoint has them (what the trainer
    evaluates), ``True`` requires them, ``False`` takes the live training weights.
    """
    return model_from_checkpoint(*read_checkpoint(checkpoint_or_run), device=torch.device(device), use_ema=use_ema)


def model_from_checkpoint(
    path: Path, state: dict[str, Any], config: TrainConfig, sizes: DataSizes, *, device: torch.device, use_ema: bool | None = None
) -> LoadedCheckpoint:
    """:func:`load_for_evaluation` for a checkpoint already read by :func:`read_checkpoint`."""
    from training.checkpoint import load_model_state  # the trainer's loader: same key handling and errors

    ema_state = state.get("ema")
    if use_ema is None and path.name == BEST_RAW_NAME:
        use_ema = False  # the live weights' best
    if use_ema and ema_state is None:
        raise EvalInputError(f"--ema: {path} holds no EMA weights (its run had ema=false); drop --ema or pass --no-ema")
    model = build_model(
        config.arch, seq_len=sizes.seq_len, vocab_size=sizes.vocab_size, num_puzzle_identifiers=sizes.num_puzzle_identifiers, device=device
    )
    load_model_state(model, state["model"], path)
    for report in ("reference_report", "chosen"):  # printed once the model has loaded: a refusal stays the only line
        if state.get(report):
            print(state[report], file=sys.stderr)
    uses_ema = ema_state is not None and use_ema is not False
    if ema_state is not None and uses_ema:
        copy_ema_weights_(model, ema_state, path)
    model.eval()
    loss_head = ACTLossHead(model, config.arch.loss_type, differential_loss=config.jd.differential_loss)
    return LoadedCheckpoint(path, int(state.get("step", 0)), config, sizes, model, loss_head, uses_ema)


@torch.no_grad()
def copy_ema_weights_(model: torch.nn.Module, ema_state: dict[str, Tensor], source: Path | str) -> None:
    """Overwrite every floating-point parameter with its exponential moving average (buffers stay)."""
    shadow = {name.replace("_orig_mod.", ""): value for name, value in ema_state.items()}
    parameters = {name: value for name, value in model.named_parameters() if value.is_floating_point()}
    missing = sorted(set(parameters) - set(shadow))
    mismatched = [name for name, value in parameters.items() if name in shadow and shadow[name].shape != value.shape]
    if missing or mismatched:
        raise CheckpointError(f"{source}: EMA weights do not fit the model (missing {missing[:4]}, shape mismatch {mismatched[:4]})")
    for name, value in parameters.items():
        value.copy_(shadow[name])


def check_dataset_fits(metadata: DatasetMetadata, sizes: DataSizes, has_puzzle_embedding: bool, dataset: str, checkpoint: Path) -> None:
    """Raise :class:`EvalInputError` naming every size of ``dataset`` that the checkpoint's model cannot take."""
    problems = []
    if metadata.seq_len != sizes.seq_len:
        problems.append(f"seq_len {metadata.seq_len} (the checkpoint's model takes {sizes.seq_len})")
    if metadata.vocab_size != sizes.vocab_size:
        problems.append(f"vocab_size {metadata.vocab_size} (the checkpoint's model takes {sizes.vocab_size})")
    if has_puzzle_embedding and metadata.num_puzzle_identifiers > sizes.num_puzzle_identifiers:
        problems.append(
            f"num_puzzle_identifiers {metadata.num_puzzle_identifiers} (the checkpoint's puzzle embedding has {sizes.num_puzzle_identifiers} rows)"
        )
    if problems:
        raise EvalInputError(f"dataset {dataset} does not fit checkpoint {checkpoint}: " + "; ".join(problems))
    if has_puzzle_embedding and metadata.num_puzzle_identifiers != sizes.num_puzzle_identifiers:
        print(
            f"note: dataset {dataset} has {metadata.num_puzzle_identifiers} puzzle identifiers and the checkpoint "
            f"{sizes.num_puzzle_identifiers}; they are used as stored, which is right only if the dataset numbers its "
            "puzzles as the training data did",
            file=sys.stderr,
        )


# ------------------------------------------------------------------------------------- output paths
def numbered_free_path(base: Path, is_free: Callable[[Path], bool] | None = None) -> Path:
    """``base`` if it is free, else the first free ``base-2``, ``base-3``, ... (suffix before the extension).

    ``is_free(path)`` decides; by default a path is free when it does not exist.
    """
    if is_free is None:
        is_free = lambda path: not path.exists()  # noqa: E731
    if is_free(base):
        return base
    index = 2
    while True:
        candidate = base.with_name(f"{base.stem}-{index}{base.suffix}") if base.suffix else base.with_name(f"{base.name}-{index}")
        if is_free(candidate):
            return candidate
        index += 1


def _holds_results(folder: Path) -> bool:
    return any((folder / name).exists() for name in RESULT_FILES)


def ensure_writable_dir(folder: Path) -> Path:
    """Write a probe file into ``folder``, or its nearest existing parent (nothing is created), so an
    unwritable place fails before the evaluation rather than after it."""
    from dataset.atomic import write_failure

    existing = folder.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise EvalInputError(f"cannot write the results into {folder}: {write_failure(folder, error)}; give a writable --out DIR") from None
    return folder


def choose_output_dir(requested: Path | None, run_dir: Path, step: int, overwrite: bool) -> Path:
    """Where results go (created, checked writable): ``requested`` (refused if it already holds results,
    unless ``overwrite``) or ``run_dir/eval/standalone-step_N`` with a numbered suffix when that one holds results."""
    return ensure_writable_dir(_output_dir(requested, run_dir, step, overwrite))


def _output_dir(requested: Path | None, run_dir: Path, step: int, overwrite: bool) -> Path:
    if requested is not None:
        if requested.exists() and not requested.is_dir():
            raise EvalInputError(f"--out {requested} is a file; give a folder")
        if _holds_results(requested) and not overwrite:
            found = [name for name in RESULT_FILES if (requested / name).exists()]
            raise EvalInputError(f"--out {requested} already holds {found}; choose another folder or pass --overwrite")
        return requested
    base = run_dir / "eval" / f"standalone-step_{step:08d}"
    if overwrite:
        return base
    return numbered_free_path(base, lambda folder: not _holds_results(folder))


def write_json_atomically(path: Path, content: Any) -> None:
    """Write JSON through a temporary file and a rename, so a reader never sees half a file."""
    atomic_write_text(path, json.dumps(content, indent=2))


# ---------------------------------------------------------------------------------------- evaluation
def parse_evaluator_names(text: str, configured: list[EvaluatorConfig]) -> list[EvaluatorConfig]:
    """``"exact,arc"`` -> evaluator configs (the checkpoint's settings for a name it already used); ``"none"`` -> []."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if names == ["none"]:
        return []
    unknown = [name for name in names if name not in EVALUATOR_NAMES]
    if unknown or not names:
        raise EvalInputError(f"--evaluators {text!r}: unknown {unknown or 'empty list'}; accepted: comma-separated {list(EVALUATOR_NAMES)} or 'none'")
    by_name: dict[str, EvaluatorConfig] = {config.name: config for config in configured}
    return [by_name.get(name) or EvaluatorConfig(name=name) for name in dict.fromkeys(names)]  # type: ignore[arg-type]  # names checked above


def _max_batches(text: str | None, configured: int | None) -> int | None:
    if text is None:
        return configured
    if text == "all":
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise EvalInputError(f"--max-batches {text!r}: give a positive integer or 'all'")
    return value


def _agree_on(value: Any, dist_info: DistInfo) -> Any:
    """Rank 0's ``value`` on every rank (an exception object is re-raised everywhere)."""
    if dist_info.world_size > 1:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        value = box[0]
    if isinstance(value, Exception):
        raise value
    return value


@dataclass
class EvalPlan:
    """Everything a standalone evaluation runs with, validated before the model is built."""

    path: Path
    loaded: LoadedCheckpoint
    data: PuzzleDataset
    data_paths: list[str]
    evaluator_configs: list[EvaluatorConfig]
    batch_size: int
    max_batches: int | None
    out_dir: Path


def plan_evaluation(args: argparse.Namespace, dist_info: DistInfo) -> EvalPlan:
    """Read the checkpoint and check every argument, the data and the output folder; then build the model."""
    path, state, config, sizes = read_checkpoint(args.checkpoint, overrides=parse_overrides(args.set), data_paths=args.data, newest=args.last)
    data_paths = list(args.data) if args.data else config.eval_paths
    batch_size = config.global_batch_size // config.grad_accum_steps if args.batch_size is None else args.batch_size
    if batch_size < 1:
        raise EvalInputError(f"--batch-size {batch_size}: must be positive")
    max_batches = _max_batches(args.max_batches, config.eval_max_batches)
    evaluator_configs = config.evaluators if args.evaluators is None else parse_evaluator_names(args.evaluators, config.evaluators)
    data = PuzzleDataset(data_paths, "test", batch_size, rank=dist_info.rank, world_size=dist_info.world_size, seed=config.seed)
    check_dataset_fits(data.metadata, sizes, config.arch.puzzle_emb_ndim > 0, ", ".join(data_paths), path)
    build_evaluators(evaluator_configs, data_paths)  # their own checks (ARC's test puzzles) before any compute
    check_variants(args, config, data.metadata)
    choice: Any = None
    if dist_info.is_main:
        try:
            choice = choose_output_dir(Path(args.out) if args.out else None, run_dir_of(path), int(state.get("step", 0)), args.overwrite)
        except EvalInputError as error:
            choice = error
    out_dir: Path = _agree_on(choice, dist_info)
    loaded = model_from_checkpoint(path, state, config, sizes, device=dist_info.device, use_ema=args.ema)
    return EvalPlan(path, loaded, data, data_paths, evaluator_configs, batch_size, max_batches, out_dir)


def check_variants(args: argparse.Namespace, config: TrainConfig, metadata: DatasetMetadata) -> None:
    """``--steps``/``--halt`` and ``--puzzle-ids``: valid values, and one kind of sweep at a time."""
    if args.steps:
        try:
            parse_depths(args.steps)
        except ValueError as error:
            raise EvalInputError(str(error)) from None
        parse_halt(args.halt, no_act=config.arch.no_act)
    elif args.halt is not None:
        raise EvalInputError("--halt chooses the halting rules of a --steps evaluation; give --steps too (e.g. --steps 1,2,4,8,16)")
    if args.puzzle_ids is None:
        return
    if args.steps:
        raise EvalInputError("--steps and --puzzle-ids: give one of them per command")
    try:
        variants = parse_identifier_variants(args.puzzle_ids)
    except ValueError as error:
        raise EvalInputError(str(error)) from None
    if config.arch.puzzle_emb_ndim == 0:
        raise EvalInputError("--puzzle-ids: this model has no puzzle embedding (arch.puzzle_emb_ndim=0), so it never reads the identifier")
    if "random" in variants and metadata.num_puzzle_identifiers < 3:
        raise EvalInputError(
            f"--puzzle-ids random: the dataset has {metadata.num_puzzle_identifiers} identifier(s) (the blank one included); "
            "another puzzle's identifier needs at least two puzzles"
        )


def parse_halt(text: str | None, no_act: bool = False) -> tuple[str, ...]:
    """``--halt`` (default ``max``) as halting rules; a bad value is an :class:`EvalInputError`."""
    try:
        return parse_halt_rules(text or "max", no_act)
    except ValueError as error:
        raise EvalInputError(str(error)) from None


def evaluate_checkpoint(args: argparse.Namespace, dist_info: DistInfo) -> dict[str, Any]:
    """Validate everything, evaluate, write ``metrics.json`` (rank 0); return the record written."""
    plan = plan_evaluation(args, dist_info)
    loaded, data = plan.loaded, plan.data
    total = data.num_test_batches() if plan.max_batches is None else min(plan.max_batches, data.num_test_batches())
    if dist_info.is_main:
        weights = "EMA" if loaded.uses_ema else "live (non-EMA)"
        capped = f" (capped by max_batches={plan.max_batches})" if plan.max_batches is not None else ""
        print(
            f"Evaluating {plan.path} (step {loaded.step}, {weights} weights) on {', '.join(plan.data_paths)}: {data.total_examples} test "
            f"examples, {total} batches of {plan.batch_size}{capped}",
            flush=True,
        )
    record: dict[str, Any] = {
        "checkpoint": str(plan.path),
        "step": loaded.step,
        "ema": loaded.uses_ema,
        "data_paths": plan.data_paths,
        "batch_size": plan.batch_size,
        "max_batches": plan.max_batches,
        "evaluators": [evaluator.name for evaluator in plan.evaluator_configs],
        "world_size": dist_info.world_size,
        "device": str(dist_info.device),
    }
    if args.steps:
        record.update(report_depths(plan, parse_depths(args.steps), parse_halt(args.halt), dist_info, quiet=args.quiet))
    elif args.puzzle_ids is not None:
        record.update(evaluate_identifier_variants(plan, parse_identifier_variants(args.puzzle_ids), dist_info, quiet=args.quiet))
    else:
        record["metrics"] = _evaluate_once(plan, dist_info, plan.data, plan.out_dir, quiet=args.quiet)
        if dist_info.is_main:
            _print_metrics(record["metrics"])
    if dist_info.is_main:
        write_json_atomically(plan.out_dir / "metrics.json", record)
        print(f"Wrote {plan.out_dir / 'metrics.json'}", flush=True)
    return record


def _evaluate_once(plan: EvalPlan, dist_info: DistInfo, data: Any, save_dir: Path, *, quiet: bool, desc: str = "evaluating") -> dict[str, float]:
    """The trainer's evaluation of ``data`` (a test split, or one with its identifiers replaced)."""
    return evaluate(
        plan.loaded.loss_head,
        ExampleProgress(data, max_batches=plan.max_batches, enabled=dist_info.is_main and not quiet, desc=desc),
        build_evaluators(plan.evaluator_configs, plan.data_paths),
        dist_info,
        global_batch_size=plan.loaded.config.global_batch_size,  # the trainer's loss scale, so logged losses match bit for bit
        max_batches=plan.max_batches,
        save_dir=save_dir if dist_info.is_main else None,
    )


def _print_metrics(metrics: dict[str, float]) -> None:
    width = max((len(key) for key in metrics), default=0)
    for key in sorted(metrics):
        print(f"  {key:<{width}}  {metrics[key]:.6g}")


def report_depths(plan: EvalPlan, depths: list[int], rules: tuple[str, ...], dist_info: DistInfo, *, quiet: bool) -> dict[str, Any]:
    """Scores at every step budget under every halting rule: the table, the summary and ``depth.png`` (rank 0)."""
    examples = ExampleProgress(plan.data, max_batches=plan.max_batches, enabled=dist_info.is_main and not quiet, desc="evaluating depths")
    make = lambda: build_evaluators(plan.evaluator_configs, plan.data_paths)
    results = evaluate_depths(plan.loaded.model, examples, depths, rules, make, dist_info, max_batches=plan.max_batches)
    if not dist_info.is_main:
        return {}
    summary = halting_summary(results)
    halt_max_steps = plan.loaded.config.arch.halt_max_steps
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    plot_depth(results, plan.out_dir / "depth.png", halt_max_steps)
    print("\n".join(depth_table(results) + summary_lines(summary)) + f"\nWrote {plan.out_dir / 'depth.png'}", flush=True)
    return {
        "halt_max_steps": halt_max_steps,
        "depth": {rule: {str(d): row for d, row in rows.items()} for rule, rows in results.items()},
        "halting": summary,
    }


def evaluate_identifier_variants(plan: EvalPlan, variants: tuple[str, ...], dist_info: DistInfo, *, quiet: bool) -> dict[str, Any]:
    """The evaluation with each kind of puzzle identifier, side by side (rank 0 prints the table)."""
    by_variant: dict[str, dict[str, float]] = {}
    for variant in variants:
        data = IdentifierVariant(plan.data, variant, seed=plan.loaded.config.seed)
        by_variant[variant] = _evaluate_once(
            plan, dist_info, data, plan.out_dir / f"puzzle_ids-{variant}", quiet=quiet, desc=f"identifiers: {variant}"
        )
    if not dist_info.is_main:
        return {}
    print("\n".join(identifier_table(by_variant)), flush=True)
    return {"metrics": by_variant[variants[0]], "puzzle_ids": by_variant}


# ----------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.evaluate",
        description="Evaluate a trm-jd checkpoint on a dataset's test split without training.",
    )
    parser.add_argument(
        "checkpoint",
        help="a checkpoint file (checkpoints/step_N.pt, best.pt), a run directory (its best checkpoint when it keeps one, else its newest), "
        "or a reference TRM step_N (or its folder)",
    )
    parser.add_argument("--last", action="store_true", help="a run directory: its newest checkpoint rather than its best")
    parser.add_argument("--data", nargs="+", default=None, metavar="PATH", help="dataset folder(s) to evaluate on (default: the run's eval data)")
    parser.add_argument(
        "--ema", action=argparse.BooleanOptionalAction, default=None, help="use the EMA weights (default: when the checkpoint has them)"
    )
    parser.add_argument("--evaluators", default=None, help=f"comma-separated, from {list(EVALUATOR_NAMES)}, or 'none' (default: the run's)")
    parser.add_argument(
        "--max-batches", default=None, metavar="N|all", help="evaluate only the first N batches (default: the run's eval_max_batches)"
    )
    parser.add_argument("--batch-size", type=int, default=None, help="global batch size (default: the run's global_batch_size / grad_accum_steps)")
    parser.add_argument("--out", default=None, metavar="DIR", help="output folder (default: RUN_DIR/eval/standalone-step_N)")
    parser.add_argument("--overwrite", action="store_true", help="allow replacing results already in the output folder")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument(
        "--set",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="reference checkpoints: a config value (e.g. arch.num_heads=8) over all_config.yaml, the weights and the reference's defaults",
    )
    parser.add_argument(
        "--steps",
        default=None,
        metavar="N,N,...",
        help="score after each of these supervision-step budgets (beyond halt_max_steps too): a table and depth.png",
    )
    parser.add_argument(
        "--halt", default=None, metavar="max,q", help="with --steps: max runs to the budget, q halts where the Q-head says (default: max)"
    )
    parser.add_argument(
        "--puzzle-ids",
        default=None,
        metavar="true,blank,random",
        help="evaluate with the true identifiers, the blank one, another puzzle's, side by side",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (0, or 2 for bad input)."""
    args = build_parser().parse_args(argv)
    try:
        dist_info = setup_distributed(args.device)
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        evaluate_checkpoint(args, dist_info)
        return 0
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        teardown_distributed()


if __name__ == "__main__":
    sys.exit(main())
