"""UPGrad's dual-cone projections timed with each solver, on synthetic and on real harvested Gramians.

``python -m analysis.benchmark --projector-sizes 64,128,256`` calls :func:`time_projectors`: for every
size ``m`` a seeded synthetic Gramian (a ``[m, 2048]`` Jacobian whose first third of rows conflicts with
the rest), the Gramians of the late-training families of :func:`late_training_jacobian` (low rank, zero
rows, duplicated, near-duplicated and tiny rows) and every harvested Gramian of that size
(``tests/fixtures/gramians``, written by ``python -m analysis.harvest_gramians``), each solved by
TorchJD's quadprog projector and by :class:`jd.projector.PivotingProjector`. A row gives the median
time, the smallest cosine between UPGrad's update and any objective's gradient (negative: the update
harms that objective), and on CPU the median time of one GD step of the demo model on a batch of ``m``
samples, measured in the same process, the cost the projections add to.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from jd.diagnostics import diagnostics_from_weights
from jd.projector import PivotingProjector

REPO = Path(__file__).resolve().parents[1]
HARVESTED = REPO / "tests" / "fixtures" / "gramians"
QUADPROG_MAX_M = 256  # TorchJD's quadprog took 11 s at m = 256 on real Gramians (one CPU thread): larger ones are skipped


def synthetic_gramian(m: int) -> Tensor:
    """The seeded Gramian of a ``[m, 2048]`` Jacobian whose first third of rows conflicts with the rest."""
    generator = torch.Generator().manual_seed(m)
    jacobian = torch.randn(m, 2048, generator=generator) + 0.3 * torch.randn(2048, generator=generator)
    jacobian[: m // 3] *= -0.5
    return (jacobian @ jacobian.T).to(torch.float64)


LATE_FAMILIES = ("low_rank", "zero_rows", "duplicates", "near_duplicates", "tiny")


def late_training_jacobian(family: str, m: int, n: int = 4000, rank: int = 48) -> Tensor:
    """A seeded ``[m, n]`` Jacobian shaped like late instance-wise training, float64: rank 48 << m and,
    beyond ``low_rank``, a quarter of zero rows (solved samples), plus duplicated or near-duplicated rows
    (the same puzzle twice) or a twelfth of tiny rows (``1e-6``), by ``family`` (:data:`LATE_FAMILIES`)."""
    if family not in LATE_FAMILIES:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(LATE_FAMILIES)}")
    generator = torch.Generator().manual_seed(7)
    basis = torch.randn(rank, n, generator=generator, dtype=torch.float64)
    jacobian = torch.randn(m, rank, generator=generator, dtype=torch.float64) @ basis - 0.5 * basis.sum(0)
    quarter = m // 4
    if family != "low_rank":
        jacobian[:quarter] = 0.0
    if family == "duplicates":
        jacobian[quarter : 2 * quarter] = jacobian[m // 2 : m // 2 + quarter]
    if family == "near_duplicates":
        noise = torch.randn(quarter, n, generator=generator, dtype=torch.float64)
        jacobian[quarter : 2 * quarter] = jacobian[m // 2 : m // 2 + quarter] * 1.000001 + 1e-7 * noise
    if family == "tiny":
        jacobian[quarter : m // 3] *= 1e-6
    return jacobian


def update_min_cosine(gramian: Tensor, weights: Tensor) -> float:
    """``min_j cos(J^T w, g_j)`` over objectives with a non-zero gradient, from the Gramian alone (the
    training diagnostic ``jd/update_alignment_min``)."""
    return diagnostics_from_weights(gramian, weights)["jd/update_alignment_min"]


def upgrad_weights(projector: Callable[[Tensor, Tensor], Tensor], gramian: Tensor) -> Tensor:
    """UPGrad's weights: the mean of the ``m`` projections of the rows of ``I / m``."""
    m = gramian.shape[0]
    lower = torch.diag(torch.full((m,), 1.0 / m, dtype=gramian.dtype, device=gramian.device))
    return projector(lower, gramian).sum(0)


def _median_ms(action: Callable[[], Any], repeats: int, device: torch.device) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(repeats + 1):  # the first is a warm-up
        started = time.perf_counter()
        result = action()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times[1:]), result


def demo_gd_step_ms(batch: int, steps: int = 3) -> float:
    """Median ms of a GD step of the demo model (CPU) on ``batch`` samples, after one warm-up step."""
    import tempfile

    from analysis.harvest_gramians import CPU, demo_config
    from pretrain import ensure_demo_data
    from training.trainer import Trainer

    with tempfile.TemporaryDirectory() as scratch:
        config = demo_config(Path(scratch), "gd", batch, method=())
        ensure_demo_data(config, CPU)
        trainer = Trainer(config, CPU)
        times = []
        for _ in range(steps + 1):
            started = time.perf_counter()
            trainer.step()
            times.append((time.perf_counter() - started) * 1000)
        trainer.data.close()
    return statistics.median(times[1:])


def projector_cases(sizes: list[int], harvested: Path = HARVESTED) -> list[tuple[str, Tensor]]:
    """``(name, Gramian)``: the synthetic one of each size, the late-training families', then the harvested ones of those sizes."""
    cases = [(f"synthetic m={m}", synthetic_gramian(m)) for m in sizes]
    for family in LATE_FAMILIES:
        cases += [(f"late {family} m={m}", (jacobian := late_training_jacobian(family, m)) @ jacobian.T) for m in sizes]
    if (harvested / "gramians.npz").exists():
        from analysis.harvest_gramians import load_gramians

        cases += [(f"real {name}", gramian) for name, gramian in load_gramians(harvested).items() if gramian.shape[0] in sizes]
    return cases


def time_projectors(
    sizes: list[int], device: torch.device, repeats: int = 3, harvested: Path = HARVESTED, quadprog_max_m: int = QUADPROG_MAX_M
) -> list[dict[str, Any]]:
    """One row per case of :func:`projector_cases`: each solver's median ms and its update's smallest cosine
    (quadprog only up to ``quadprog_max_m``)."""
    from torchjd.linalg import QuadprogProjector

    solvers: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"quadprog": QuadprogProjector(), "pivoting": PivotingProjector()}  # type: ignore[dict-item]  # TorchJD's PSDMatrix marker is a Tensor at run time
    gd_ms: dict[int, float] = {}
    rows = []
    for name, gramian in projector_cases(sizes, harvested):
        m = gramian.shape[0]
        gramian = gramian.to(device)
        row: dict[str, Any] = {"case": name, "m": m}
        for label, solver in solvers.items():
            if label == "quadprog" and m > quadprog_max_m:
                row[f"{label}_ms"] = row[f"{label}_min_cos"] = None
                continue
            row[f"{label}_ms"], weights = _median_ms(partial(upgrad_weights, solver, gramian), repeats, device)
            row[f"{label}_min_cos"] = update_min_cosine(gramian.double(), weights.double())
        row["speedup"] = row["quadprog_ms"] / row["pivoting_ms"] if row["quadprog_ms"] else None
        if device.type == "cpu" and m not in gd_ms:
            gd_ms[m] = demo_gd_step_ms(m)  # once per size
        row["gd_step_ms"] = gd_ms.get(m)
        rows.append(row)
        print(f"projector {name}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    return rows


def projector_markdown(rows: list[dict[str, Any]]) -> list[str]:
    """The rows as a Markdown table with its legend."""
    number = lambda value, spec: "-" if value is None else format(value, spec)  # noqa: E731
    lines = [
        "",
        "UPGrad's m dual-cone projections (median ms; min cos: the smallest cosine of UPGrad's update with any objective's gradient;",
        "GD step: one GD step of the demo model on m samples, same process, on CPU; '-': not run (quadprog above a size, GD off CPU)):",
        "",
        "| Gramian | m | quadprog (TorchJD) | min cos | pivoting (jd.projector) | min cos | speed-up | GD step | pivoting / GD step |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        ratio = row["pivoting_ms"] / row["gd_step_ms"] if row.get("gd_step_ms") else None
        lines.append(
            f"| {row['case']} | {row['m']} | {number(row['quadprog_ms'], '.1f')} | {number(row['quadprog_min_cos'], '+.2e')} | "
            f"{row['pivoting_ms']:.1f} | {number(row['pivoting_min_cos'], '+.2e')} | {number(row['speedup'], '.1f')} | "
            f"{number(row.get('gd_step_ms'), '.0f')} | {number(ratio, '.2f')} |"
        )
    return lines
