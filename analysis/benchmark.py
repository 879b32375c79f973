"""Benchmark one training step of GD and of each JD split x engine, at the paper's ARC size or a tiny one.

    python -m analysis.benchmark --preset tiny                       # CPU, seconds
    python -m analysis.benchmark --preset arc --device cuda          # the paper's ARC model, batch 96
    python -m analysis.benchmark --preset arc --device cuda --no-compile

Every variant runs warm-up steps, then timed optimizer steps (forward of every supervision step, the
JD/GD backward, the reductions and both optimizers), on the same model and synthetic batch. It prints
and writes (JSON and Markdown) per variant: objectives ``m``, median ms/step, ratio to GD, peak memory
and its ratio to GD. A supervision stack of ``K`` steps is compared with ``K`` GD steps, since that is
the work it replaces.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` over the variant's steps (model, optimizer
states, activations, Jacobians), with every variant in the benchmark's process. On CPU every variant
runs in a fresh process (``--isolate``, the default there) and the figure is how far that process's
peak resident memory grew above what was resident just before the model was built (on Linux the
kernel's peak is restarted there): the same quantities, plus allocator slack.

``--projector-sizes 32,96`` also times the dual-cone projections of UPGrad (``m`` quadratic programs
on an ``m x m`` Gramian) with TorchJD's quadprog projector and with this project's pivoting one, on
synthetic and on real harvested Gramians (:mod:`analysis.projector_benchmark`).
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import platform
import re
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from analysis.projector_benchmark import projector_markdown, time_projectors
from jd.config import JDConfig
from jd.splits import method_of
from jd.step import build_jd_step
from models.losses import ACTLossHead
from models.optimizers import make_adam_atan2
from models.recursive_reasoning.config import ArchConfig
from models.registry import build_model, compile_core
from models.sparse_embedding import SignSGDSparseEmbedding
from training.state import capture_rng
from training.supervision import SupervisionLoop
from training.threads import choose_threads

PRESETS: dict[str, dict[str, Any]] = {
    # The paper's ARC-AGI model: hidden 512, 8 heads, 2 layers, H=3, L=4, 900 cells + 16 puzzle positions.
    "arc": dict(
        arch=dict(
            hidden_size=512, num_heads=8, expansion=4, L_layers=2, H_cycles=3, L_cycles=4, puzzle_emb_ndim=512, puzzle_emb_len=16, halt_max_steps=16
        ),
        seq_len=900,
        vocab_size=12,
        num_puzzles=1000,
        batch_size=96,
    ),
    "tiny": dict(
        arch=dict(
            hidden_size=64, num_heads=4, expansion=4, L_layers=2, H_cycles=2, L_cycles=2, puzzle_emb_ndim=64, puzzle_emb_len=1, halt_max_steps=8
        ),
        seq_len=16,
        vocab_size=11,
        num_puzzles=8,
        batch_size=32,
    ),
}

VARIANTS: dict[str, dict[str, Any]] = {
    "gd": dict(split="none"),
    "lm_vs_halt": dict(split="lm_loss_vs_q_halt_loss"),
    "iwrm": dict(split="iwrm_with_q_halt_in"),
    "pixelwise_10": dict(split="pixelwise_q_halt_in", n_groups=10),
    "pixelwise_10_vmap": dict(split="pixelwise_q_halt_in", n_groups=10, parallel_chunk_size=None),
    "stack_internal": dict(split="stack_internal_and_sum"),
    "stack_supervisions": dict(split="stack_supervisions_and_sum"),
    "stack_supervisions_iwrm": dict(split="stack_supervisions_and_iwrm"),
    # Loss-weighting baselines on the IWRM objectives: one backward (FAMO adds a forward without gradient).
    "iwrm_scalarizer_uw": dict(split="iwrm_with_q_halt_in", scalarizer="uw"),
    "iwrm_scalarizer_famo": dict(split="iwrm_with_q_halt_in", scalarizer="famo"),
}


MEMORY_NOTES: dict[str, str] = {
    "iwrm": "the Jacobian engine holds the m x n Jacobian (one row of all n weights per sample) as per-parameter blocks "
    "while it back-propagates row after row through the kept graph; the per-sample engine (iwrm[auto]) gets the same "
    "rows from one backward",
    "pixelwise_10_vmap": "torch.vmap back-propagates the 10 Jacobian rows together, holding 10 rows' intermediate "
    "gradients at once; the default jd.parallel_chunk_size=1 back-propagates them one at a time (pixelwise_10)",
    "stack_supervisions_iwrm": "the K supervision steps' graphs stay alive until the one JD backward (GD frees each "
    "step's graph after its own backward), and the per-sample gradients of all K x B objectives are held together",
    "stack_supervisions": "the K supervision steps' graphs stay alive until the one backward of their sum; GD frees each step's "
    "graph after its own backward",
}
"""Why a variant's memory can exceed twice GD's; printed under the table when it does."""


@dataclass
class Result:
    variant: str
    split: str
    aggregator: str
    engine: str
    objectives: int
    supervision_steps: int
    median_ms: float
    min_ms: float | None = None  # less sensitive than the median to a busy, shared machine
    ratio_to_gd: float | None = None
    peak_mem_mib: float | None = None
    mem_ratio_to_gd: float | None = None
    gd_similarity: float | None = None
    error: str | None = None
    step_ms: list[float] = field(default_factory=list)
    ab_ratios: list[float] = field(default_factory=list)  # x GD per interleaved repetition (--ab-repetitions)


def interleaved_ratios(
    preset: dict[str, Any], jd_values: dict[str, Any], *, device: torch.device, compile_model: bool, warmup: int, repetitions: int, steps: int
) -> list[float]:
    """The variant's time per supervision step over GD's, once per repetition, with GD and the variant built in
    one process and timed alternately (ABBA order): load that shifts during the run hits both sides of every
    ratio, which separate runs cannot promise on a shared machine."""
    torch.manual_seed(0)
    gd = _Variant(preset, JDConfig(**VARIANTS["gd"]), device, compile_model)
    jd = _Variant(preset, JDConfig(**jd_values), device, compile_model)
    for _ in range(warmup):
        gd.step(), jd.step()
    ratios = []
    for repetition in range(repetitions):
        order = (gd, jd) if repetition % 2 == 0 else (jd, gd)
        seconds = {id(variant): _timed_steps(variant, steps, device) for variant in order}
        ratios.append(round(seconds[id(jd)] / (jd.loop.supervision_steps * seconds[id(gd)]), 4))
    return ratios


def _timed_steps(variant: _Variant, steps: int, device: torch.device) -> float:
    started = time.perf_counter()
    for _ in range(steps):
        variant.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


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
    name: str,
    preset: dict[str, Any],
    jd_values: dict[str, Any],
    *,
    device: torch.device,
    compile_model: bool,
    warmup: int,
    steps: int,
    prime: bool = False,
) -> Result:
    """Time ``steps`` optimizer steps of one variant after ``warmup`` untimed ones.

    ``prime``: first run the variant once at batch size 2, so that what PyTorch and TorchJD load or
    start on first use (modules, thread pools, kernel libraries) is not counted in its CPU peak memory.
    """
    # torch.vmap falls back to a per-row loop for the CPU attention backward (pixelwise_10_vmap); the
    # table shows its cost, the warning repeated for every variant would bury the table.
    warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented the batching rule")
    if prime:
        small = {**preset, "batch_size": 2}
        run_variant(name, small, jd_values, device=device, compile_model=compile_model, warmup=0, steps=1)
        gc.collect()
    _restart_resident_peak()
    resident_before = _peak_resident_mib()
    torch.manual_seed(0)
    jd_config = JDConfig(**jd_values)
    variant = _Variant(preset, jd_config, device, compile_model)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times: list[float] = []
    last_metrics: dict[str, float] = {}
    for index in range(warmup + steps):
        started = time.perf_counter()
        last_metrics = variant.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if index >= warmup:
            times.append((time.perf_counter() - started) * 1000)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else _peak_resident_mib() - resident_before
    return Result(
        variant=name,
        split=jd_config.split,
        aggregator=method_of(jd_config),
        engine=variant.jd_step.engine,
        objectives=int(last_metrics.get("jd/num_objectives", 1)),
        supervision_steps=variant.loop.supervision_steps,
        median_ms=statistics.median(times),
        min_ms=min(times),
        peak_mem_mib=peak,
        gd_similarity=last_metrics.get("jd/gd_similarity"),
        step_ms=[round(t, 2) for t in times],
    )


class _Variant:
    """One benchmarked configuration: the model, its JD step and optimizers, and one synthetic batch; :meth:`step`
    runs an optimizer step through the trainer's own supervision loop (:class:`training.supervision.SupervisionLoop`)."""

    def __init__(self, preset: dict[str, Any], jd_config: JDConfig, device: torch.device, compile_model: bool) -> None:
        arch = ArchConfig(**preset["arch"])
        if compile_model:
            jd_config.check_compilable()
        self.jd_step = build_jd_step(jd_config, halt_max_steps=arch.halt_max_steps)
        self.batch_size = preset["batch_size"]
        m = self.jd_step.split.global_num_objectives(
            batch_size=self.batch_size,
            seq_len=preset["seq_len"],
            H_cycles=arch.H_cycles,
            halt_max_steps=arch.halt_max_steps,
            world_size=1,
            n_groups=jd_config.n_groups,
        )
        self.scalarizer = self.jd_step.build_scalarizer(m, device)
        self.model = build_model(
            arch, seq_len=preset["seq_len"], vocab_size=preset["vocab_size"], num_puzzle_identifiers=preset["num_puzzles"], device=device
        )
        if compile_model:
            compile_core(self.model, repeated_backward=jd_config.split != "none")
        head = ACTLossHead(self.model)
        self.loop = SupervisionLoop(
            head,
            self.jd_step.split,
            jd_config,
            global_batch_size=self.batch_size,
            grad_accum_steps=1,
            halt_max_steps=arch.halt_max_steps,
            agree_on_halting=False,
            carry_shape=(self.batch_size, preset["seq_len"], preset["seq_len"] + self.model.puzzle_emb_len, arch.hidden_size),
            device=device,
        )
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = make_adam_atan2(self.params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
        assert self.model.puzzle_embedding is not None
        self.embedding = self.model.puzzle_embedding
        self.sparse = SignSGDSparseEmbedding([self.embedding], lr=1e-2, weight_decay=0.1)
        self.batches = [synthetic_batch(preset, device)] * self.loop.batches_per_step
        self.carry = head.initial_carry(self.batches[0])

    def step(self) -> dict[str, float]:
        """One optimizer step; returns the JD step's metrics."""
        famo = (self.carry, capture_rng()) if self.scalarizer is not None and self.scalarizer.updates_after_step else None
        with self.jd_step.forward_context(self.model, self.batch_size) as weights:
            self.carry, steps = self.loop.run(self.carry, self.batches, weights=weights)
            metrics = self.jd_step.backward(steps, self.params, [rows for _, rows in self.embedding.pending_rows()])
        self.jd_step.finish(self.params)
        self.optimizer.step()
        self.sparse.step()
        if famo is not None:  # FAMO: the objectives again, after the step
            self.jd_step.recomputed(self.loop.recompute(self.batches, *famo))
        self.optimizer.zero_grad(set_to_none=True)
        return metrics


def _restart_resident_peak() -> None:
    """Restart the kernel's record of this process's peak resident memory (Linux; elsewhere a no-op).

    Without it the peak is the process's since it began, and a variant that stays below the peak of
    what ran before it (its priming run, the imports) would read as growing by 0 MiB.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_resident_mib() -> float:
    """This process's peak resident memory since the last restart, in MiB (``VmHWM`` on Linux, else ``ru_maxrss``)."""
    try:
        match = re.search(r"^VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    except OSError:
        match = None
    if match:
        return int(match.group(1)) / 2**10
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def _variant_in_child(queue: Any, name: str, preset: dict[str, Any], jd_values: dict[str, Any], options: dict[str, Any]) -> None:
    """Entry point of an isolated variant (``--isolate``): run it and send back its result or error."""
    options = dict(options)
    torch.set_num_threads(options.pop("threads"))  # a spawned process starts with torch's default again
    try:
        queue.put(run_variant(name, preset, jd_values, prime=options["device"].type == "cpu", **options))
    except Exception as error:  # noqa: BLE001 - reported by the parent like an in-process failure
        queue.put(f"{type(error).__name__}: {error}".splitlines()[0])


def run_isolated(name: str, preset: dict[str, Any], jd_values: dict[str, Any], **options: Any) -> Result:
    """:func:`run_variant` in a fresh process, so that its peak memory is its own."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_variant_in_child, args=(queue, name, preset, jd_values, options))
    process.start()
    try:
        outcome = queue.get()
    finally:
        process.join()
    if isinstance(outcome, str):
        raise RuntimeError(outcome)
    return outcome


def to_markdown(results: list[Result], header: dict[str, Any], projectors: list[dict[str, Any]] | None = None) -> str:
    lines = [
        f"Benchmark: preset `{header['preset']}`, {header['device_name']}, compile={header['compile']}, threads={header.get('threads')}, "
        f"batch {header['batch_size']}, median of {header['steps']} steps after {header['warmup']} warm-up.",
        "",
        "| variant | split | engine | m | ms/step | x GD | x GD interleaved: median [min, max] | min ms | peak MiB | mem x GD | GD similarity |",
        "|---|---|---|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in results:
        if r.error:
            lines.append(f"| {r.variant} | {r.split} | {r.engine} | | failed: {r.error[:80]} | | | | | | |")
            continue
        fmt = lambda v, d=2: "" if v is None else f"{v:.{d}f}"  # noqa: E731
        ab = f"{statistics.median(r.ab_ratios):.2f} [{min(r.ab_ratios):.2f}, {max(r.ab_ratios):.2f}]" if r.ab_ratios else ""
        lines.append(
            f"| {r.variant} | {r.split} | {r.engine} | {r.objectives} | {r.median_ms:.1f} | {fmt(r.ratio_to_gd)} | {ab} | {fmt(r.min_ms, 1)} | "
            f"{fmt(r.peak_mem_mib, 0)} | {fmt(r.mem_ratio_to_gd)} | {fmt(r.gd_similarity, 4)} |"
        )
    lines.append("")
    lines.append("Ratios of a supervision stack of K steps are to K GD steps (the work it replaces). " + header["memory"])
    if any(r.ab_ratios for r in results):
        lines.append(
            f"Interleaved: GD and the variant built in one process and timed alternately, {header.get('ab_repetitions')} repetitions "
            f"of {header['steps']} steps each (ABBA order); the median and the range of the per-repetition ratios."
        )
    for r in results:
        base = r.variant.split("[")[0]
        if r.mem_ratio_to_gd is not None and r.mem_ratio_to_gd > 2:
            reason = MEMORY_NOTES.get(base, "no explanation is recorded for this variant in analysis.benchmark.MEMORY_NOTES")
            lines.append(f"- {r.variant} uses {r.mem_ratio_to_gd:.1f}x GD's memory: {reason}.")
    if projectors:
        lines += projector_markdown(projectors)
    return "\n".join(lines) + "\n"


def _write(out_json: Path, out_md: Path, header: dict[str, Any], results: list[Result], projectors: list[dict[str, Any]]) -> None:
    """Write what has been measured so far (a run cut short keeps its finished variants)."""
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps({"header": header, "results": [asdict(r) for r in results], "projectors": projectors}, indent=2))
    out_md.write_text(to_markdown(results, header, projectors))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="default: on for CUDA, off for CPU")
    parser.add_argument(
        "--isolate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="each variant in a fresh process (default: on for CPU, where it measures peak memory)",
    )
    parser.add_argument(
        "--projector-sizes",
        default="",
        help="comma-separated m: also time UPGrad's projections with both solvers, on synthetic Gramians and the harvested ones of these sizes",
    )
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {','.join(VARIANTS)}")
    parser.add_argument("--engines", default="auto", help="comma-separated jd.engine values to try for JD variants")
    parser.add_argument("--aggregator", default="upgrad")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: training's rule, threads=null)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--ab-repetitions", type=int, default=0, metavar="N", help="also measure each x GD ratio from N interleaved GD/variant repetitions"
    )
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("benchmarks"), help="folder for benchmark-<preset>-<device>[-eager].{json,md}")
    parser.add_argument("--overwrite", action="store_true")
    return parser


@dataclass
class _Settings:
    """What the command line asks for, checked."""

    device: torch.device
    compile_model: bool
    threads: int
    isolate: bool
    projector_sizes: list[int]
    preset: dict[str, Any]
    out_json: Path
    out_md: Path


def _settings(args: argparse.Namespace, parser: argparse.ArgumentParser) -> _Settings:
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; accepted: {', '.join(VARIANTS)}")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    compile_model = device.type == "cuda" if args.compile is None else args.compile
    try:
        projector_sizes = [int(size) for size in args.projector_sizes.split(",") if size]
    except ValueError:
        parser.error(f"--projector-sizes {args.projector_sizes!r}: expected comma-separated integers such as 32,96")
    preset = dict(PRESETS[args.preset])
    if args.batch_size:
        preset["batch_size"] = args.batch_size
    stem = f"benchmark-{args.preset}-{device.type}{'' if compile_model else '-eager'}"
    out_json, out_md = args.out / f"{stem}.json", args.out / f"{stem}.md"
    if not args.overwrite and (out_json.exists() or out_md.exists()):
        parser.error(f"{out_json} exists; pass --overwrite or another --out")
    isolate = device.type == "cpu" if args.isolate is None else args.isolate
    threads, note = choose_threads(args.threads, device)  # training's rule: never a function of the machine's load
    if note:
        print(note, file=sys.stderr)
    return _Settings(device, compile_model, threads, isolate, projector_sizes, preset, out_json, out_md)


def _header(args: argparse.Namespace, settings: _Settings, argv: list[str] | None) -> dict[str, Any]:
    device = settings.device
    return {
        "preset": args.preset,
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "compile": settings.compile_model,
        "threads": settings.threads,
        "batch_size": settings.preset["batch_size"],
        "warmup": args.warmup,
        "ab_repetitions": args.ab_repetitions,
        "steps": args.steps,
        "torch": torch.__version__,
        "isolated": settings.isolate,
        "memory": (
            "Peak memory: torch.cuda.max_memory_allocated."
            if device.type == "cuda"
            else "Peak memory: growth of peak resident memory (ru_maxrss) of a fresh process per variant from before the model was built."
            if settings.isolate
            else "Peak memory: not measured on CPU without --isolate."
        ),
        "command": "python -m analysis.benchmark " + " ".join(argv if argv is not None else sys.argv[1:]),
    }


def _measure(label: str, values: dict[str, Any], engine: str, args: argparse.Namespace, settings: _Settings) -> Result:
    """One variant's result (its error when it failed)."""
    device = settings.device
    options = dict(device=device, compile_model=settings.compile_model, warmup=args.warmup, steps=args.steps)
    try:
        if settings.isolate:
            result = run_isolated(label, settings.preset, values, threads=settings.threads, **options)
        else:
            result = run_variant(label, settings.preset, values, **options)
    except Exception as error:  # noqa: BLE001 - a failing variant is reported, the others still run
        result = Result(label, values["split"], args.aggregator, engine, 0, 1, float("nan"), error=f"{type(error).__name__}: {error}".splitlines()[0])
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if not settings.isolate and device.type == "cpu":
        result.peak_mem_mib = None  # in one process, memory freed by earlier variants stays resident and hides growth
    return result


def _add_ratios(result: Result, gd: Result | None) -> None:
    """The variant's time per supervision step and peak memory as multiples of the GD baseline's."""
    if gd is not None and not result.error and not gd.error:
        result.ratio_to_gd = result.median_ms / (result.supervision_steps * gd.median_ms)
        if result.peak_mem_mib is not None and gd.peak_mem_mib:
            result.mem_ratio_to_gd = result.peak_mem_mib / gd.peak_mem_mib


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    settings = _settings(args, parser)
    torch.set_num_threads(settings.threads)
    if settings.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    header = _header(args, settings, argv)
    results: list[Result] = []
    projectors: list[dict[str, Any]] = []
    gd: Result | None = None
    names = args.variants.split(",")
    if "gd" in names:  # first: every other variant is compared with it
        names.remove("gd")
        names.insert(0, "gd")
    for name in names:
        engines = ["gd"] if name == "gd" else args.engines.split(",")
        for engine in engines:
            values = dict(VARIANTS[name])
            if name != "gd" and "scalarizer" not in values:
                values.update(aggregator=args.aggregator, engine=engine)
            label = name if len(engines) == 1 else f"{name}[{engine}]"
            result = _measure(label, values, engine, args, settings)
            if args.ab_repetitions > 0 and name != "gd" and not result.error:
                options = dict(device=settings.device, compile_model=settings.compile_model, warmup=args.warmup, steps=args.steps)
                result.ab_ratios = interleaved_ratios(settings.preset, values, repetitions=args.ab_repetitions, **options)
            gd = result if name == "gd" else gd
            _add_ratios(result, gd)
            results.append(result)
            _write(settings.out_json, settings.out_md, header, results, projectors)
            shown = (
                "failed: " + result.error
                if result.error
                else f"{result.median_ms:.1f} ms/step" + (f" ({result.ratio_to_gd:.2f}x GD)" if result.ratio_to_gd else "")
            )
            print(f"{label:32s} m={result.objectives:<5d} {shown}", flush=True)
    if settings.projector_sizes:
        projectors = time_projectors(settings.projector_sizes, settings.device)
        _write(settings.out_json, settings.out_md, header, results, projectors)
    print("\n" + to_markdown(results, header, projectors))
    print(f"wrote {settings.out_json} and {settings.out_md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
