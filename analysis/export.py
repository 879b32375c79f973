"""Export a checkpoint in the reference TRM code's format: ``OUT_DIR/step_N`` and ``OUT_DIR/all_config.yaml``.

    python -m analysis.export runs/arc1/a1 exported/a1                 # newest checkpoint, EMA weights if kept
    python -m analysis.export runs/arc1/a1/checkpoints/step_00010000.pt exported/a1-10k --no-ema
    python -m analysis.export RUN OUT --no-compile-prefix              # keys for a reference run with DISABLE_COMPILE=1

``step_N`` is a bare ``state_dict`` of the reference's loss-head-wrapped model (``model.inner.*``),
prefixed ``_orig_mod.`` by default, as the reference's ``load_checkpoint`` expects of a compiled model,
its default; ``all_config.yaml`` is the run's config in the reference's names, so the reference's
scripts (``load_checkpoint=OUT/step_N``, evaluation notebooks) take the model as it is. TRM and HRM
export; the transformer baseline has no reference counterpart. Existing files are never replaced.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from analysis.evaluate import USER_ERRORS, EvalInputError, model_from_checkpoint, read_checkpoint
from training.reference_checkpoint import write_reference_checkpoint


def export(checkpoint: str, out_dir: str, *, use_ema: bool | None = None, compiled: bool = True) -> Path:
    """Write ``checkpoint`` (a run or checkpoint of this toolkit) in the reference format; return ``step_N``'s path."""
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise EvalInputError(f"{out_dir} is a file; give a folder for step_N and all_config.yaml")
    path, state, config, sizes = read_checkpoint(checkpoint)
    if "format" not in state:
        raise EvalInputError(f"{path} is already a reference checkpoint; nothing to export")
    loaded = model_from_checkpoint(path, state, config, sizes, device=torch.device("cpu"), use_ema=use_ema)
    target = write_reference_checkpoint(loaded.model.state_dict(), config.model_dump(mode="json"), Path(out_dir), loaded.step, compiled=compiled)
    weights = "EMA" if loaded.uses_ema else "live"
    print(f"Wrote {target} ({weights} weights of {path}) and {target.parent / 'all_config.yaml'}")
    return target


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (0, or 2 for bad input)."""
    parser = argparse.ArgumentParser(prog="python -m analysis.export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a run directory (its newest checkpoint) or a checkpoint file of this toolkit")
    parser.add_argument("out_dir", help="folder for step_N and all_config.yaml (existing files are never replaced)")
    parser.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None, help="export the EMA weights (default: when the run kept them)")
    parser.add_argument("--no-compile-prefix", action="store_true", help="keys without _orig_mod. (for a reference run with DISABLE_COMPILE=1)")
    args = parser.parse_args(argv)
    try:
        export(args.checkpoint, args.out_dir, use_ema=args.ema, compiled=not args.no_compile_prefix)
        return 0
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
