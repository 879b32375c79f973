"""Harvest real UPGrad Gramians from instance-wise training on the demo task (the projector benchmark's fixture).

    python -m analysis.harvest_gramians --stages 0,300,1200 --sizes 64,128,256 --late-sizes 512,768 \\
        --out tests/fixtures/gramians

trains the demo TRM with IWRM + UPGrad (``jd.split=iwrm_with_q_halt_in``, the demo's batch of 64) in a
scratch directory. At each stage (an optimizer step) it copies the weights into a trainer whose batch is
``m`` samples and records the ``m x m`` Gramian of one batch's per-sample gradients, the matrix UPGrad's
projections solve on, for every size (``--late-sizes`` only at the last stage: they are the large files).
Writes ``gramians.npz`` (``step<S>-m<M>``: float32 ``[m, m]``) and ``manifest.json`` (the command, the
versions, and per Gramian its trace, numerical rank, zero rows and share of conflicting pairs).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jd.diagnostics import diagnostics_from_weights
from jd.update import JDUpdate
from training.config import TrainConfig
from training.distributed import DistInfo
from training.numerics import run_numerics
from training.trainer import Trainer

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def demo_config(
    scratch: Path, name: str, batch: int, seed: int = 0, method: Sequence[str] = ("jd.split=iwrm_with_q_halt_in", "jd.aggregator=upgrad")
) -> TrainConfig:
    """The demo's config on ``batch`` samples per step, run ``name`` under ``scratch``, quiet and on CPU;
    ``method``: the ``jd.*`` overrides (IWRM + UPGrad by default, ``()`` for GD)."""
    from pretrain import compose_config

    overrides = [f"global_batch_size={batch}", f"runs_root={scratch}", f"run_name={name}", f"seed={seed}"]
    return compose_config([*method, *overrides, "eval_steps=[]", "progress_bar=false", "wandb.mode=disabled", "device=cpu"])


def gramian_of_batch(trainer: Trainer) -> torch.Tensor:
    """The Gramian of the per-sample gradients of ``trainer``'s next batch (nothing is updated)."""
    captured: list[torch.Tensor] = []
    apply = trainer.jd_step._apply

    def recording(update: JDUpdate, params: list[torch.Tensor], rows: list[torch.Tensor]) -> dict[str, float]:
        assert update.gramian is not None, "the per-sample engine computes the Gramian"
        captured.append(update.gramian.detach().to(torch.float64).clone())
        return apply(update, params, rows)

    trainer.jd_step._apply = recording  # type: ignore[method-assign]  # a recording wrapper around the real method
    batches = trainer.data.next_batches(trainer.supervision.batches_per_step)
    assert batches is not None
    trainer.accumulate_gradients(batches)
    trainer.optimizers.zero_grad()
    return captured[0]


def describe(gramian: torch.Tensor) -> dict[str, Any]:
    """What makes a Gramian hard for the projector: its scale, numerical rank, zero rows and conflicts."""
    eigenvalues = torch.linalg.eigvalsh(gramian)
    diagonal = gramian.diagonal()
    statistics = diagnostics_from_weights(gramian, torch.ones_like(diagonal))
    return {
        "m": gramian.shape[0],
        "trace": float(diagonal.sum()),
        "numerical_rank": int((eigenvalues > 1e-10 * eigenvalues.max()).sum()),
        "zero_rows": int((diagonal <= 1e-12 * diagonal.max()).sum()),
        "conflict_fraction": statistics["jd/conflict_fraction"],
    }


def harvest(stages: Sequence[int], sizes: Sequence[int], late_sizes: Sequence[int], seed: int = 0) -> dict[str, torch.Tensor]:
    """``{"step<S>-m<M>": Gramian}`` for every stage and size (``late_sizes`` at the last stage only)."""
    gramians: dict[str, torch.Tensor] = {}
    with tempfile.TemporaryDirectory() as scratch:
        from pretrain import ensure_demo_data

        training = demo_config(Path(scratch), "train", 64, seed)
        ensure_demo_data(training, CPU)
        trainer = Trainer(training, CPU)
        for stage in sorted(stages):
            while trainer.progress.step < stage:
                if trainer.step() is None:
                    raise SystemExit(f"error: the demo's data ran out before step {stage}")
            for m in [*sizes, *(late_sizes if stage == max(stages) else [])]:
                probe = Trainer(demo_config(Path(scratch), f"probe-{stage}-{m}", m, seed + stage), CPU)
                probe.model.load_state_dict(trainer.model.state_dict())
                gramians[f"step{stage}-m{m}"] = gramian_of_batch(probe)
                probe.data.close()
                print(f"step {stage}, m = {m}: {describe(gramians[f'step{stage}-m{m}'])}", flush=True)
        trainer.data.close()
    return gramians


def load_gramians(folder: Path) -> dict[str, torch.Tensor]:
    """The harvested Gramians of ``folder`` (float64), by name."""
    with np.load(folder / "gramians.npz") as archive:
        return {name: torch.from_numpy(archive[name]).to(torch.float64) for name in archive.files}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.harvest_gramians", description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", default="0,300,1200", help="optimizer steps at which to harvest (comma-separated)")
    parser.add_argument("--sizes", default="64,128,256", help="Gramian sizes m at every stage")
    parser.add_argument("--late-sizes", default="512,768", help="Gramian sizes m at the last stage only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="folder for gramians.npz and manifest.json")
    args = parser.parse_args(argv)
    try:
        stages, sizes, late = ([int(v) for v in text.split(",") if v] for text in (args.stages, args.sizes, args.late_sizes))
    except ValueError:
        parser.error("--stages, --sizes and --late-sizes take comma-separated whole numbers")
    if not stages or min(stages) < 0 or any(m < 2 for m in [*sizes, *late]):
        parser.error("give at least one stage >= 0, and sizes of at least 2")
    gramians = harvest(stages, sizes, late, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, Any] = {name: g.to(torch.float32).numpy() for name, g in gramians.items()}
    np.savez_compressed(args.out / "gramians.npz", **arrays)
    manifest = {
        "command": "python -m analysis.harvest_gramians " + " ".join(sys.argv[1:] if argv is None else argv),
        "numerics": run_numerics(torch.device("cpu"), torch.float32, compiled=False, world_size=1),
        "gramians": {name: describe(g.to(torch.float32).to(torch.float64)) for name, g in gramians.items()},
    }
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"wrote {args.out / 'gramians.npz'} and {args.out / 'manifest.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
