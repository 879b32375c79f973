"""Watch a recursive model refine its answer: one puzzle, the answer after every ACT step, as a PNG.

    python -m analysis.visualize_recursion runs/sudoku4/my-run --index 3
    python -m analysis.visualize_recursion runs/arc1/run --puzzle 00576224 --out 00576224.png
    python -m analysis.visualize_recursion CHECKPOINT --data data/maze12 --split train --index 0 --no-ema

The model is rebuilt from the checkpoint (as :mod:`analysis.evaluate` does, EMA weights by default when
the run kept them) and run in eval mode one supervision step at a time, ``arch.halt_max_steps``
steps. The figure shows the input, the prediction (argmax tokens) after each step and the target.
Each step's panel says its step, the halting probability ``sigmoid(q_halt)`` and whether the answer
is exact; cells that differ from the target get a red border and cells that changed since the
previous step a corner mark. The step at which ACT would first halt (the training-time halting rule)
is flagged. Drawing depends on the dataset's ``kind``: ARC's ten colours on the canvas cropped to the
grids, Sudoku digits as text with the givens in black, Maze walls / open cells / start / goal / path
in colours; any other kind shows token numbers.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.colors import to_hex, to_rgb  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch, Polygon, Rectangle  # noqa: E402
from torch import Tensor  # noqa: E402

from analysis.evaluate import (  # noqa: E402
    USER_ERRORS,
    EvalInputError,
    check_dataset_fits,
    model_from_checkpoint,
    numbered_free_path,
    parse_overrides,
    read_checkpoint,
    run_dir_of,
)
from dataset.common import BLANK_IDENTIFIER, DatasetError, DatasetMetadata, read_identifiers, read_metadata, read_split  # noqa: E402
from models.loss_terms import IGNORE_LABEL_ID  # noqa: E402
from models.recursive_reasoning.act import ACTModel  # noqa: E402

ARC_COLOURS = ("#000000", "#0074D9", "#FF4136", "#2ECC40", "#FFDC00", "#AAAAAA", "#F012BE", "#FF851B", "#7FDBFF", "#870C25")
"""The ten standard ARC colours, colour 0 (black) to 9 (maroon)."""
ARC_PAD_COLOUR = "#F4F4F4"  # outside the grid (token 0)
ARC_MARKER_COLOUR = "#C8C8C8"  # end-of-grid marker (token 1)
MAZE_COLOURS = {0: "#F4F4F4", 1: "#2B2B2B", 2: "#FFFFFF", 3: "#2ECC40", 4: "#FF4136", 5: "#0074D9"}
"""Maze tokens (see dataset.build_maze_dataset): pad, wall ``#``, open, start ``S``, goal ``G``, path ``o``."""
MAZE_LETTERS = {3: "S", 4: "G"}
WRONG_COLOUR = "#E00000"
GIVEN_COLOUR = "#111111"
FILLED_COLOUR = "#1F4FBF"


@dataclass(frozen=True)
class Example:
    """One example of a dataset split, as a batch of one row ready for the model."""

    batch: dict[str, Tensor]  # inputs, labels (IGNORE_LABEL_ID where unscored), puzzle_identifiers, example_index
    metadata: DatasetMetadata
    dataset: Path
    split: str
    index: int
    puzzle_name: str


@dataclass(frozen=True)
class StepPrediction:
    """The model's answer after one ACT (supervision) step."""

    step: int  # 1-based
    tokens: np.ndarray  # [seq_len] argmax tokens
    q_halt_probability: float  # sigmoid(q_halt_logit)
    halts: bool  # the training-time halting rule would stop here
    exact: bool  # every scored token equals the label
    token_accuracy: float  # fraction of scored tokens right


# ------------------------------------------------------------------------------------ the example
def find_example_index(dataset: Path, split: str, index: int | None, puzzle: str | None) -> int:
    """The example index in ``split``: ``index`` itself, or the ``index``-th example of puzzle ``puzzle``."""
    metadata = read_metadata(dataset)
    if split not in metadata.splits:
        raise EvalInputError(f"--split {split!r}: {dataset} holds the splits {sorted(metadata.splits)}")
    total = metadata.splits[split].total_examples
    if puzzle is None:
        if index is None:
            raise EvalInputError("give --index K (an example of the split), or --puzzle NAME for an ARC puzzle")
        if not 0 <= index < total:
            raise EvalInputError(f"--index {index} is outside the {total} examples of split {split!r} of {dataset} (0..{total - 1})")
        return index
    if metadata.kind != "arc":
        raise EvalInputError(f"--puzzle picks ARC puzzles by name; {dataset} is a {metadata.kind!r} dataset: use --index K")
    identifiers = read_identifiers(dataset)
    if puzzle not in identifiers:
        close = difflib.get_close_matches(puzzle, identifiers, n=3)
        hint = f"; close names: {close}" if close else "; names are listed in identifiers.json"
        raise EvalInputError(f"--puzzle {puzzle!r} is not a puzzle of {dataset}{hint}")
    arrays = read_split(dataset, split, metadata, mmap=True)
    rows = np.flatnonzero(arrays.puzzle_identifiers == identifiers.index(puzzle))
    examples = [e for row in rows for e in range(int(arrays.puzzle_indices[row]), int(arrays.puzzle_indices[row + 1]))]
    if not examples:
        raise EvalInputError(f"--puzzle {puzzle!r} has no example in split {split!r} of {dataset}; try --split train")
    within = 0 if index is None else index
    if not 0 <= within < len(examples):
        raise EvalInputError(f"--index {within}: puzzle {puzzle!r} has {len(examples)} example(s) in split {split!r} (0..{len(examples) - 1})")
    return examples[within]


def load_example(dataset: Path, split: str, index: int) -> Example:
    """Example ``index`` of one dataset folder's split, encoded as the loader encodes it."""
    metadata = read_metadata(dataset)
    arrays = read_split(dataset, split, metadata, mmap=True)
    total = arrays.inputs.shape[0]
    if not 0 <= index < total:
        raise EvalInputError(f"--index {index} is outside the {total} examples of split {split!r} of {dataset} (0..{total - 1})")
    labels = np.asarray(arrays.labels[index], dtype=np.int64)
    labels = np.where(labels == metadata.ignore_label_id, IGNORE_LABEL_ID, labels)
    puzzle = int(np.searchsorted(arrays.puzzle_indices, index, side="right") - 1)
    identifier = int(arrays.puzzle_identifiers[puzzle])
    batch = {
        "inputs": torch.from_numpy(np.asarray(arrays.inputs[index], dtype=np.int64)).unsqueeze(0),
        "labels": torch.from_numpy(labels).unsqueeze(0),
        "puzzle_identifiers": torch.tensor([identifier], dtype=torch.int64),
        "example_index": torch.tensor([index], dtype=torch.int64),
    }
    return Example(batch, metadata, dataset, split, index, read_identifiers(dataset)[identifier])


# ------------------------------------------------------------------------------------ the recursion
@torch.no_grad()
def trace_recursion(model: ACTModel, batch: dict[str, Tensor]) -> list[StepPrediction]:
    """Run ``model`` in eval mode one ACT step at a time on a batch of one example; record every step."""
    if batch["inputs"].shape[0] != 1:
        raise ValueError(f"trace_recursion takes a batch of one example, got {batch['inputs'].shape[0]}")
    was_training = model.training
    model.eval()
    device = model.H_init.device
    batch = {key: value.to(device) for key, value in batch.items()}
    carry = model.initial_carry(batch)
    steps = []
    try:
        for step in range(1, model.config.halt_max_steps + 1):
            carry, outputs = model(carry, batch)
            preds = outputs["logits"][0].argmax(-1)
            labels = carry.data["labels"][0]
            scored = labels != IGNORE_LABEL_ID
            right = int((scored & (preds == labels)).sum())
            q_halt = float(outputs["q_halt_logits"][0])
            q_continue = float(outputs["q_continue_logits"][0])
            halts = q_halt > 0 if model.config.no_ACT_continue else q_halt > q_continue
            steps.append(
                StepPrediction(
                    step=step,
                    tokens=preds.cpu().numpy(),
                    q_halt_probability=float(torch.sigmoid(torch.tensor(q_halt, dtype=torch.float64))),
                    halts=bool(halts),
                    exact=bool(scored.any()) and right == int(scored.sum()),
                    token_accuracy=right / max(int(scored.sum()), 1),
                )
            )
    finally:
        model.train(was_training)
    return steps


# -------------------------------------------------------------------------------------- rendering
def view_window(metadata: DatasetMetadata, canvases: Sequence[np.ndarray]) -> tuple[int, int]:
    """Rows and columns of the canvas to draw: the whole grid, or for ARC the extent of the grids that
    ``canvases`` decode to (``dataset.arc_augment.tokens_to_grid``) plus their end markers."""
    rows, cols = metadata.grid_shape
    if metadata.kind != "arc":
        return rows, cols
    from dataset.arc_augment import tokens_to_grid

    shapes = [grid.shape for grid in (tokens_to_grid(canvas) for canvas in canvases) if grid is not None]
    if not shapes:
        return rows, cols
    return min(rows, max(shape[0] for shape in shapes) + 1), min(cols, max(shape[1] for shape in shapes) + 1)


def token_colours(tokens: np.ndarray, kind: str, vocab_size: int) -> np.ndarray:
    """``[H, W, 3]`` RGB colours of a token grid, by dataset kind."""
    if kind == "arc":
        table = [ARC_PAD_COLOUR, ARC_MARKER_COLOUR, *ARC_COLOURS]
    elif kind == "maze":
        table = [MAZE_COLOURS.get(token, "#FF00FF") for token in range(max(vocab_size, 6))]
    elif kind == "sudoku":
        table = ["#F4F4F4"] + ["#FFFFFF"] * (max(vocab_size, 11) - 1)
    else:
        cmap = plt.get_cmap("tab20")
        table = [to_hex(cmap(token % 20)) for token in range(vocab_size)]
    rgb = np.array([to_rgb(colour) for colour in table])
    return rgb[np.clip(tokens, 0, len(rgb) - 1)]


def _cell_text(token: int, kind: str) -> str:
    if kind == "sudoku":
        return str(token - 1) if token >= 2 else ""
    if kind == "maze":
        return MAZE_LETTERS.get(token, "")
    if kind == "arc":
        return ""
    return str(token)


def _draw_grid(
    ax: Axes,
    tokens: np.ndarray,
    metadata: DatasetMetadata,
    *,
    wrong: np.ndarray | None = None,
    changed: np.ndarray | None = None,
    given: np.ndarray | None = None,
) -> None:
    """Draw one ``[H, W]`` token grid with optional wrong / changed marks and Sudoku givens."""
    rows, cols = tokens.shape
    ax.imshow(token_colours(tokens, metadata.kind, metadata.vocab_size), interpolation="nearest", extent=(0, cols, rows, 0))
    ax.set_xticks(np.arange(cols + 1))
    ax.set_yticks(np.arange(rows + 1))
    ax.grid(color="#BBBBBB", linewidth=0.4)
    ax.tick_params(length=0, labelbottom=False, labelleft=False)
    if metadata.kind == "sudoku":
        from dataset.build_sudoku_dataset import BOX_SHAPES

        box_rows, box_cols = BOX_SHAPES.get(rows, (rows, cols))
        for r in range(0, rows + 1, box_rows):
            ax.axhline(r, color="#222222", linewidth=1.6)
        for c in range(0, cols + 1, box_cols):
            ax.axvline(c, color="#222222", linewidth=1.6)
    font = max(4.0, min(14.0, 110.0 / max(rows, cols)))
    line = max(0.6, min(1.6, 12.0 / max(rows, cols)))
    for r in range(rows):
        for c in range(cols):
            text = _cell_text(int(tokens[r, c]), metadata.kind)
            is_wrong = wrong is not None and wrong[r, c]
            if text:
                colour = WRONG_COLOUR if is_wrong else GIVEN_COLOUR if (given is None or given[r, c]) else FILLED_COLOUR
                weight = "bold" if given is None or given[r, c] else "normal"
                ax.text(c + 0.5, r + 0.5, text, ha="center", va="center", fontsize=font, color=colour, weight=weight)
            if is_wrong:
                ax.add_patch(Rectangle((c + 0.06, r + 0.06), 0.88, 0.88, fill=False, edgecolor="white", linewidth=line + 1.0))
                ax.add_patch(Rectangle((c + 0.06, r + 0.06), 0.88, 0.88, fill=False, edgecolor=WRONG_COLOUR, linewidth=line))
            if changed is not None and changed[r, c]:
                ax.add_patch(Polygon([(c, r), (c + 0.45, r), (c, r + 0.45)], closed=True, facecolor="white", edgecolor="black", linewidth=0.5))
    ax.set_xlim(0, cols)
    ax.set_ylim(rows, 0)


def _arc_grid_note(tokens: np.ndarray, target: np.ndarray) -> str:
    """ARC: the size of the grid a prediction decodes to, when it is not the target's (the evaluator scores that grid)."""
    from dataset.arc_augment import tokens_to_grid

    grid, expected = tokens_to_grid(tokens), tokens_to_grid(target)
    if grid is None:
        return "\nno grid at the top-left"
    if expected is not None and grid.shape != expected.shape:
        return f"\ndecodes to {grid.shape[0]}x{grid.shape[1]}, target {expected.shape[0]}x{expected.shape[1]}"
    return ""


def _legend_handles(kind: str) -> list[Any]:
    """The figure's legend: what a red frame, a corner mark and (per task) the colours mean."""
    handles: list[Any] = [
        Patch(facecolor="none", edgecolor=WRONG_COLOUR, linewidth=2, label="differs from the target"),
        Line2D(
            [],
            [],
            marker=[(0, 0), (1, 0), (0, -1), (0, 0)],
            linestyle="none",
            markerfacecolor="white",
            markeredgecolor="black",
            markersize=9,
            label="changed since the previous step",
        ),
    ]
    if kind == "sudoku":
        handles.append(Patch(facecolor="white", edgecolor=FILLED_COLOUR, label="blue digits: filled in by the model"))
    if kind == "maze":
        handles += [Patch(color=MAZE_COLOURS[token], label=name) for token, name in ((1, "wall"), (3, "start"), (4, "goal"), (5, "path"))]
    return handles


def render_recursion(example: Example, steps: Sequence[StepPrediction], out_path: Path | str, title: str, dpi: int = 120) -> Path:
    """Draw input, every step's answer and the target into one PNG at ``out_path``; return the path."""
    out_path = Path(out_path)
    metadata = example.metadata
    grid_rows, grid_cols = metadata.grid_shape
    inputs = example.batch["inputs"][0].numpy()
    labels = example.batch["labels"][0].numpy()
    target = np.where(labels == IGNORE_LABEL_ID, metadata.pad_id, labels)
    rows, cols = view_window(metadata, [inputs, target])  # predictions are drawn in the input/target window

    def crop(flat: np.ndarray) -> np.ndarray:
        return flat.reshape(grid_rows, grid_cols)[:rows, :cols]

    scored = crop(labels != IGNORE_LABEL_ID)
    given = crop(inputs >= 2) if metadata.kind == "sudoku" else None
    panels = 2 + len(steps)
    ncols = min(panels, 6)
    nrows = -(-panels // ncols)
    size = max(2.2, min(3.6, 0.32 * max(rows, cols)))
    title_height = 0.75 if metadata.kind == "arc" else 0.55  # two or three lines of text above each panel
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, (size + title_height) * nrows + 0.9), squeeze=False, layout="constrained")
    flat_axes = list(axes.flat)

    _draw_grid(flat_axes[0], crop(inputs), metadata)
    flat_axes[0].set_title("input", fontsize=10)
    previous: np.ndarray | None = None
    first_halt = next((step.step for step in steps if step.halts), None)
    for ax, step in zip(flat_axes[1:], steps):
        tokens = crop(step.tokens)
        wrong = scored & (tokens != crop(target))
        _draw_grid(ax, tokens, metadata, wrong=wrong, changed=None if previous is None else tokens != previous, given=given)
        verdict = "exact" if step.exact else f"not exact ({step.token_accuracy:.0%} cells)"
        if metadata.kind == "arc":
            verdict += _arc_grid_note(step.tokens, target)
        halt_note = "  [ACT halts]" if step.step == first_halt else ""
        colour = "#107010" if step.exact else "black"
        ax.set_title(f"step {step.step}: p(halt) {step.q_halt_probability:.2f}{halt_note}\n{verdict}", fontsize=9, color=colour)
        previous = tokens
    _draw_grid(flat_axes[len(steps) + 1], crop(target), metadata)
    flat_axes[len(steps) + 1].set_title("target", fontsize=10)
    for ax in flat_axes[panels:]:
        ax.axis("off")

    handles = _legend_handles(metadata.kind)
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=11)
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out_path, dpi=dpi)
    except OSError as error:  # no half-written picture left behind
        out_path.unlink(missing_ok=True)
        raise DatasetError(f"cannot write {out_path}: {error.strerror or error}") from None
    finally:
        plt.close(fig)
    return out_path


# ------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.visualize_recursion",
        description="Draw a model's answer after every ACT step for one puzzle (PNG).",
    )
    parser.add_argument("checkpoint", help="a checkpoint file or a run directory (its newest checkpoint)")
    parser.add_argument("--index", type=int, default=None, help="example of the split; with --puzzle, the puzzle's K-th example (default 0)")
    parser.add_argument("--puzzle", default=None, help="ARC: a puzzle name from identifiers.json (e.g. 007bbfb7)")
    parser.add_argument("--data", default=None, metavar="PATH", help="dataset folder (default: the run's first eval dataset)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--out", default=None, metavar="PNG", help="output file (default: RUN_DIR/visualizations/recursion-SPLIT-K-step_N.png)")
    parser.add_argument("--overwrite", action="store_true", help="allow replacing an existing --out file")
    parser.add_argument(
        "--ema", action=argparse.BooleanOptionalAction, default=None, help="use the EMA weights (default: when the checkpoint has them)"
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--dpi", type=int, default=120)
    parser.add_argument(
        "--set", action="append", default=None, metavar="KEY=VALUE", help="reference checkpoints: a config value (e.g. arch.num_heads=8)"
    )
    return parser


def _device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise EvalInputError("--device cuda: CUDA is not available; use --device cpu or auto")
    return torch.device("cuda" if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()) else "cpu")


def visualize(args: argparse.Namespace) -> Path:
    """Validate the arguments, trace the recursion and write the PNG; return its path."""
    path, state, config, sizes = read_checkpoint(args.checkpoint, overrides=parse_overrides(args.set), data_paths=[args.data] if args.data else None)
    step = int(state.get("step", 0))
    dataset = Path(args.data) if args.data else Path(config.eval_paths[0])
    if not args.data and len(config.eval_paths) > 1:
        print(f"note: the run evaluates on {len(config.eval_paths)} datasets; showing the first, {dataset}", file=sys.stderr)
    metadata = read_metadata(dataset)
    check_dataset_fits(metadata, sizes, config.arch.puzzle_emb_ndim > 0, str(dataset), path)
    if args.index is not None and args.index < 0:
        raise EvalInputError(f"--index {args.index}: must be >= 0")
    if args.dpi < 20:
        raise EvalInputError(f"--dpi {args.dpi}: must be >= 20")
    index = find_example_index(dataset, args.split, args.index, args.puzzle)
    if args.out:
        out = Path(args.out)
        if out.suffix.lower() != ".png":
            raise EvalInputError(f"--out {out}: the figure is a PNG; give a path ending in .png")
        if out.exists() and not args.overwrite:
            raise EvalInputError(f"--out {out} already exists; choose another path or pass --overwrite")
    else:
        out = numbered_free_path(run_dir_of(path) / "visualizations" / f"recursion-{args.split}-{index}-step_{step:08d}.png")

    loaded = model_from_checkpoint(path, state, config, sizes, device=_device(args.device), use_ema=args.ema)
    example = load_example(dataset, args.split, index)
    steps = trace_recursion(loaded.model, example.batch)
    weights = "EMA" if loaded.uses_ema else "live"
    puzzle = "" if example.puzzle_name == BLANK_IDENTIFIER else f" · puzzle {example.puzzle_name}"
    title = f"{metadata.kind} · {dataset.name} {args.split} example {index}{puzzle} · checkpoint step {step} ({weights} weights)"
    render_recursion(example, steps, out, title, dpi=args.dpi)
    summary = ", ".join(f"{s.step}:{'exact' if s.exact else f'{s.token_accuracy:.0%}'}" for s in steps)
    print(f"steps {summary}\nWrote {out}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (0, or 2 for bad input)."""
    args = build_parser().parse_args(argv)
    try:
        visualize(args)
        return 0
    except (*USER_ERRORS, DatasetError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
