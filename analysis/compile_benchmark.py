"""Compile time and steady step time of GD and each JD engine: eager, whole-core compile, regional compile.

    python -m analysis.compile_benchmark --preset tiny --steps 10

TRM repeats one small reasoning module ``H_cycles x (L_cycles + 1)`` times per supervision step.
``compile=true`` compiles the whole core, the unrolled recursion; ``compile=regional`` compiles the
repeated module only, once (:func:`models.registry.compile_core`). Each (variant, mode) runs in a fresh
process with an empty inductor cache folder (a cold start): the first optimizer step's time, which holds the
compilation, and the median of the next ``--steps`` (steady state). Compile time is the first step minus
one steady step. Inductor on CPU; on CUDA the same with its kernels.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

MODES = ("eager", "whole", "regional")
VARIANTS: dict[str, dict[str, Any]] = {
    "gd": dict(split="none"),
    "iwrm-per_sample": dict(split="iwrm_with_q_halt_in", engine="per_sample"),
    "lm_vs_halt-gramian": dict(split="lm_loss_vs_q_halt_loss", engine="gramian"),
    "lm_vs_halt-autojac": dict(split="lm_loss_vs_q_halt_loss", engine="autojac"),
    "pixelwise4-gramian": dict(split="pixelwise_q_halt_in", n_groups=4, engine="gramian"),
}


def measure(preset_name: str, variant: str, mode: str, steps: int, device: str) -> dict[str, Any]:
    """One (variant, mode) in this process: first-step and steady step times in ms."""
    from analysis.benchmark import PRESETS, _Variant
    from jd.config import JDConfig
    from models.registry import compile_core

    values = dict(VARIANTS[variant])
    if values["split"] != "none":
        values["aggregator"] = "upgrad"
    config = JDConfig(**values)
    torch.manual_seed(0)
    built = _Variant(PRESETS[preset_name], config, torch.device(device), compile_model=False)
    if mode != "eager":
        config.check_compilable()
        compile_core(built.model, repeated_backward=config.split != "none", regional=mode == "regional")
    times = []
    for _ in range(steps + 1):
        started = time.perf_counter()
        built.step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - started) * 1000)
    steady = statistics.median(times[1:])
    return {"variant": variant, "mode": mode, "first_ms": times[0], "steady_ms": steady, "compile_s": max(0.0, times[0] - steady) / 1000}


def _child(queue: Any, *args: Any) -> None:
    import os
    import tempfile

    # A cold start: inductor's on-disk caches (FX graphs, AOT autograd) in a fresh folder, or a second run
    # would time cache reads instead of compilation.
    with tempfile.TemporaryDirectory(prefix="compile-benchmark-") as cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        try:
            queue.put(measure(*args))
        except Exception as error:  # reported in the table, the other rows still run
            queue.put(f"{type(error).__name__}: {str(error).splitlines()[0][:160]}")


def measure_isolated(*args: Any) -> dict[str, Any] | str:
    """:func:`measure` in a fresh process (spawned: nothing compiled is inherited)."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(queue, *args))
    process.start()
    try:
        return queue.get()
    finally:
        process.join()


def table(rows: list[dict[str, Any] | tuple[str, str, str]]) -> str:
    lines = ["| variant | mode | compile s | steady ms/step | x eager |", "|---|---|---:|---:|---:|"]
    eager: dict[str, float] = {}
    for row in rows:
        if isinstance(row, tuple):
            lines.append(f"| {row[0]} | {row[1]} | failed: {row[2]} | | |")
            continue
        if row["mode"] == "eager":
            eager[row["variant"]] = row["steady_ms"]
        base = eager.get(row["variant"])
        ratio = f"{row['steady_ms'] / base:.2f}" if base else ""
        compile_s = "-" if row["mode"] == "eager" else f"{row['compile_s']:.1f}"
        lines.append(f"| {row['variant']} | {row['mode']} | {compile_s} | {row['steady_ms']:.1f} | {ratio} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.compile_benchmark", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=("tiny", "arc"), default="tiny")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--steps", type=int, default=10, help="steady steps timed after the first (compiling) one")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {','.join(VARIANTS)} (JD ones with UPGrad)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {','.join(MODES)}")
    args = parser.parse_args(argv)
    variants, modes = args.variants.split(","), args.modes.split(",")
    unknown = [v for v in variants if v not in VARIANTS] + [m for m in modes if m not in MODES]
    if unknown or args.steps < 1:
        parser.error(f"unknown variants or modes {unknown} (or --steps < 1); variants: {list(VARIANTS)}, modes: {list(MODES)}")
    rows: list[dict[str, Any] | tuple[str, str, str]] = []
    for variant in variants:
        for mode in modes:
            outcome = measure_isolated(args.preset, variant, mode, args.steps, args.device)
            rows.append(outcome if isinstance(outcome, dict) else (variant, mode, outcome))
            print(f"{variant} / {mode}: {outcome}", flush=True)
    print(f"\npreset {args.preset}, {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}\n\n" + table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
