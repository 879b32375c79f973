"""Benchmark one training step of GD and of each JD split x engine, at the paper's ARC size or a tiny one.

    python -m analysis.benchmark --preset tiny                       # CPU, seconds
    python -m analysis.benchmark --preset arc --device cuda          # the paper's ARC model, batch 96
    python -m analysis.benchmark --preset arc --device cuda --no-compile

Every variant runs warm-up steps, then timed optimizer steps (forward of every supervision step, the
JD/GD backward, the reductions and both optimizers), on the same model and synthetic batch. It prints
and writes (JSON and Markdown) per variant: objectives ``m``, median ms/step, ratio to GD in the same
process, peak CUDA memory and its ratio to GD. A supervision stack of ``K`` steps is compared with
``K`` GD steps (``gd_equivalent_steps``), since that is the work it replaces.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from jd.config import JDConfig
from jd.step import build_jd_step
from models.losses import ACTLossHead
from models.optimizers import make_adam_atan2
from models.recursive_reasoning.config import ArchConfig
from models.registry import build_model
from models.sparse_embedding import SignSGDSparseEmbedding

PRESETS: dict[str, dict[str, Any]] = {
    # The paper's ARC-AGI model: hidden 512, 8 heads, 2 layers, H=3, L=4, 900 cells + 16 puzzle positions.
    "arc": dict(
        arch=dict(hidden_size=512, num_heads=8, expansion=4, L_layers=2, H_cycles=3, L_cycles=4, puzzle_emb_ndim=512, puzzle_emb_len=16, halt_max_steps=16),
        seq_len=900, vocab_size=12, num_puzzles=1000, batch_size=96,
    ),
    "tiny": dict(
        arch=dict(hidden_size=64, num_heads=4, expansion=4, L_layers=2, H_cycles=2, L_cycles=2, puzzle_emb_ndim=64, puzzle_emb_len=1, halt_max_steps=8),
        seq_len=16, vocab_size=11, num_puzzles=8, batch_size=32,
    ),
}

VARIANTS: dict[str, dict[str, Any]] = {
    "gd": dict(split="none"),
    "lm_vs_halt": dict(split="lm_loss_vs_q_halt_loss"),
    "iwrm": dict(split="iwrm_with_q_halt_in"),
    "pixelwise_10": dict(split="pixelwise_q_halt_in", n_groups=10),
    "stack_internal": dict(split="stack_internal_and_sum"),
    "stack_supervisions": dict(split="stack_supervisions_and_sum"),
    "stack_supervisions_iwrm": dict(split="stack_supervisions_and_iwrm"),
}


@dataclass
class Result:
    variant: str
    split: str
    aggregator: str
    engine: str
    objectives: int
    supervision_steps: int
    median_ms: float
    ratio_to_gd: float | None = None
    peak_mem_gib: float | None = None
    mem_ratio_to_gd: float | None = None
    gd_similarity: float | None = None
    error: str | None = None
    step_ms: list[float] = field(default_factory=list)


def synthetic_batch(preset: dict[str, Any], device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    batch, seq, vocab = preset["batch_size"], preset["seq_len"], preset["vocab_size"]
    labels = torch.randint(2, vocab, (batch, seq), generator=generator)
    labels[:, seq * 3 // 4 :] = -100  # padding, as real grids leave part of the canvas unscored
    return {
        "inputs": torch.randint(0, vocab, (batch, seq), generator=generator).to(device),
        "labels": labels.to(device),
        "puzzle_identifiers": torch.randint(1, preset["num_puzzles"], (batch,), generator=generator).to(device),
    }


def run_variant(
    name: str, preset: dict[str, Any], jd_values: dict[str, Any], *, device: torch.device, compile_model: bool, warmup: int, steps: int
) -> Result:
    """Time ``steps`` optimizer steps of one variant after ``warmup`` untimed ones."""
    torch.manual_seed(0)
    arch = ArchConfig(**preset["arch"])
    if compile_model and jd_values.get("split", "none") != "none":
        jd_values = {**jd_values, "parallel_chunk_size": 1}  # torch.vmap cannot run a compiled backward
    jd_config = JDConfig(**{"aggregator": "upgrad", **jd_values})
    jd_step = build_jd_step(jd_config)
    model = build_model(arch, seq_len=preset["seq_len"], vocab_size=preset["vocab_size"], num_puzzle_identifiers=preset["num_puzzles"], device=device)
    if compile_model:
        if jd_config.split != "none":
            torch._functorch.config.donated_buffer = False
        model.core.compile()
    head = ACTLossHead(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_adam_atan2(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    sparse = SignSGDSparseEmbedding([model.puzzle_embedding], lr=1e-2, weight_decay=0.1)
    batch = synthetic_batch(preset, device)
    supervision = jd_step.split.supervision_steps(arch.halt_max_steps)
    batch_size = preset["batch_size"]
    carry = head.initial_carry(batch)
    times: list[float] = []
    last_metrics: dict[str, float] = {}
    forward_context = getattr(jd_step, "forward_context", None)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    for index in range(warmup + steps):
        started = time.perf_counter()
        terms_list = []
        with forward_context(model, batch_size) if forward_context else nullcontext():
            for _ in range(supervision):
                carry, terms, _, _, _ = head(carry, batch, global_batch_size=batch_size, keep_cycle_logits=jd_step.split.needs_cycle_logits)
                terms_list.append(terms)
            last_metrics = jd_step.backward(terms_list, params, [rows for _, rows in model.puzzle_embedding.pending_rows()])
        jd_step.finish(params)
        optimizer.step()
        sparse.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if index >= warmup:
            times.append((time.perf_counter() - started) * 1000)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return Result(
        variant=name,
        split=jd_config.split,
        aggregator="gd" if jd_config.split == "none" else jd_config.aggregator,
        engine=getattr(jd_step, "engine", "?"),
        objectives=int(last_metrics.get("jd/num_objectives", 1)),
        supervision_steps=supervision,
        median_ms=statistics.median(times),
        peak_mem_gib=peak,
        gd_similarity=last_metrics.get("jd/gd_similarity"),
        step_ms=[round(t, 2) for t in times],
    )


def to_markdown(results: list[Result], header: dict[str, Any]) -> str:
    lines = [
        f"Benchmark: preset `{header['preset']}`, {header['device_name']}, compile={header['compile']}, "
        f"batch {header['batch_size']}, median of {header['steps']} steps after {header['warmup']} warm-up.",
        "",
        "| variant | split | engine | m | ms/step | x GD | peak GiB | mem x GD | GD similarity |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if r.error:
            lines.append(f"| {r.variant} | {r.split} | {r.engine} | | failed: {r.error[:80]} | | | | |")
            continue
        fmt = lambda v, d=2: "" if v is None else f"{v:.{d}f}"  # noqa: E731
        lines.append(
            f"| {r.variant} | {r.split} | {r.engine} | {r.objectives} | {r.median_ms:.1f} | {fmt(r.ratio_to_gd)} | "
            f"{fmt(r.peak_mem_gib)} | {fmt(r.mem_ratio_to_gd)} | {fmt(r.gd_similarity, 4)} |"
        )
    lines.append("")
    lines.append("Ratios of a supervision stack of K steps are to K GD steps (the work it replaces).")
    return "\n".join(lines) + "\n"


def _write(out_json: Path, out_md: Path, header: dict[str, Any], results: list[Result]) -> None:
    """Write what has been measured so far (a run cut short keeps its finished variants)."""
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps({"header": header, "results": [asdict(r) for r in results]}, indent=2))
    out_md.write_text(to_markdown(results, header))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="default: on for CUDA, off for CPU")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {','.join(VARIANTS)}")
    parser.add_argument("--engines", default="auto", help="comma-separated jd.engine values to try for JD variants")
    parser.add_argument("--aggregator", default="upgrad")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("benchmarks"), help="folder for benchmark-<preset>-<device>[-eager].{json,md}")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)

    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; accepted: {', '.join(VARIANTS)}")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    compile_model = device.type == "cuda" if args.compile is None else args.compile
    preset = dict(PRESETS[args.preset])
    if args.batch_size:
        preset["batch_size"] = args.batch_size
    stem = f"benchmark-{args.preset}-{device.type}{'' if compile_model else '-eager'}"
    out_json, out_md = args.out / f"{stem}.json", args.out / f"{stem}.md"
    if not args.overwrite and (out_json.exists() or out_md.exists()):
        parser.error(f"{out_json} exists; pass --overwrite or another --out")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True

    header = {
        "preset": args.preset,
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "compile": compile_model,
        "batch_size": preset["batch_size"],
        "warmup": args.warmup,
        "steps": args.steps,
        "torch": torch.__version__,
        "command": "python -m analysis.benchmark " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    results: list[Result] = []
    gd: Result | None = None
    names = args.variants.split(",")
    if "gd" in names:
        names.remove("gd")
        names.insert(0, "gd")
    for name in names:
        engines = ["gd"] if name == "gd" else args.engines.split(",")
        for engine in engines:
            values = dict(VARIANTS[name])
            if name != "gd":
                values.update(aggregator=args.aggregator, engine=engine)
            label = name if len(engines) == 1 else f"{name}[{engine}]"
            try:
                result = run_variant(label, preset, values, device=device, compile_model=compile_model, warmup=args.warmup, steps=args.steps)
            except Exception as error:  # noqa: BLE001 - a failing variant is reported, the others still run
                result = Result(label, values["split"], args.aggregator, engine, 0, 1, float("nan"), error=f"{type(error).__name__}: {error}".splitlines()[0])
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            if name == "gd":
                gd = result
            if gd is not None and not result.error and not gd.error:
                k = result.supervision_steps
                result.ratio_to_gd = result.median_ms / (k * gd.median_ms)
                if result.peak_mem_gib is not None and gd.peak_mem_gib:
                    result.mem_ratio_to_gd = result.peak_mem_gib / gd.peak_mem_gib
            results.append(result)
            _write(out_json, out_md, header, results)
            shown = "failed: " + result.error if result.error else f"{result.median_ms:.1f} ms/step" + (f" ({result.ratio_to_gd:.2f}x GD)" if result.ratio_to_gd else "")
            print(f"{label:32s} m={result.objectives:<5d} {shown}", flush=True)

    print("\n" + to_markdown(results, header))
    print(f"wrote {out_json} and {out_md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
