"""Plot how far Jacobian descent departs from gradient descent: ``jd/gd_similarity`` against the step.

The GD similarity is the cosine between the aggregated JD update and the plain GD update; 1 means JD
took the GD step. One line per run, or, with ``--group-by``, one mean line per group (e.g. per split and
aggregator, the mean over seeds) with ``--band`` shading mean ± one standard deviation across the group.

    python -m analysis.plot_gd_similarity runs/sweep1 --group-by split,aggregator --band --smooth 20 \\
        --out reports/sweep1/gd_similarity

writes ``reports/sweep1/gd_similarity.png`` and ``.svg``. GD runs carry no JD diagnostics; they are
listed and skipped (the dashed line at 1 is where they would sit).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from analysis.runs import DEFAULT_GROUP_BY, AnalysisError, Run, group_name, group_runs, parse_label_fields
from analysis.sources import load_runs
from analysis.wandb_source import WandbUnavailableError

GD_SIMILARITY = "jd/gd_similarity"
FIGURE_FORMATS = ("png", "svg")
COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray", "tab:olive", "tab:cyan")
LINESTYLES = ("-", "--", ":", "-.")


def group_colors(runs: Sequence[Run], group_by: Sequence[str] = DEFAULT_GROUP_BY) -> dict[str, str]:
    """One colour per group of ``runs`` (by its name), and per run (by its source) the colour of its group.

    Give every figure of a report the colours of *all* its runs (GD ones included, even where a figure
    skips them), so that a method has the same colour in each figure.
    """
    colors: dict[str, str] = {}
    for index, (key, members) in enumerate(group_runs(runs, group_by).items()):
        colors[group_name(key, group_by)] = COLORS[index % len(COLORS)]
        colors.update({run.source: COLORS[index % len(COLORS)] for run in members})
    return colors


def metric_range(metric: str) -> tuple[float, float] | None:
    """The values ``metric`` can take, where its name says: shares and accuracies ``[0, 1]``, cosines ``[-1, 1]``."""
    name = metric.rsplit("/", 1)[-1]
    if "accuracy" in name or "pass@" in name or "fraction" in name:
        return (0.0, 1.0)
    if "similarity" in name or "alignment" in name or name.startswith("cos"):
        return (-1.0, 1.0)
    return None


class OutputExistsError(AnalysisError):
    """An output file exists and ``--overwrite`` was not given."""


class MissingMetricError(AnalysisError):
    """None of the runs logged the metric a figure needs."""


@dataclass(frozen=True)
class Curve:
    """One line of a figure: a run's series, or a group's mean with its spread across runs.

    ``key`` names the run or group the same way in every figure (colours follow it); ``label`` is the
    legend text.
    ``std`` is None for a single run's line; for a group it is the standard deviation across the runs
    that cover each step (0 where one run does), and ``n_runs`` is the group's size.
    """

    key: str
    label: str
    steps: np.ndarray
    mean: np.ndarray
    std: np.ndarray | None
    n_runs: int


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over the last ``window`` points (fewer at the start); ``window=1`` is the identity."""
    if window < 1:
        raise ValueError(f"the smoothing window must be at least 1, got {window}")
    values = np.asarray(values, dtype=np.float64)
    if window == 1 or values.size == 0:
        return values.copy()
    sums = np.cumsum(np.concatenate([[0.0], values]))
    ends = np.arange(1, values.size + 1)
    starts = np.maximum(ends - window, 0)
    return (sums[ends] - sums[starts]) / (ends - starts)


def run_curve(run: Run, metric: str, smooth: int = 1, label: str | None = None) -> Curve:
    """``metric``'s finite values for one run, smoothed over ``smooth`` logged points; labelled with its method."""
    steps, values = run.metrics.series(metric, finite_only=True)
    label = label or f"{run.name} ({group_name(run.labels(DEFAULT_GROUP_BY), DEFAULT_GROUP_BY)})"
    return Curve(key=run.source, label=label, steps=steps, mean=moving_average(values, smooth), std=None, n_runs=1)


def mean_curve(label: str, runs: Sequence[Run], metric: str, smooth: int = 1) -> Curve:
    """The mean of the runs' (smoothed) curves on the union of their steps.

    Each run is linearly interpolated between its own logged steps and counts only within its own
    step range, so a run that stopped early leaves the mean from that step on.
    """
    curves = [run_curve(run, metric, smooth) for run in runs]
    curves = [c for c in curves if c.steps.size]
    if not curves:
        raise MissingMetricError(f"no run in group {label!r} logged {metric!r}")
    steps = np.unique(np.concatenate([c.steps for c in curves]))
    stacked = np.full((len(curves), steps.size), np.nan)
    for row, curve in zip(stacked, curves):
        inside = (steps >= curve.steps[0]) & (steps <= curve.steps[-1])
        row[inside] = np.interp(steps[inside], curve.steps, curve.mean)
    covered = np.isfinite(stacked)
    count = covered.sum(axis=0)
    total = np.where(covered, stacked, 0.0).sum(axis=0)
    mean = total / count
    spread = np.where(covered, (stacked - mean) ** 2, 0.0).sum(axis=0) / count
    return Curve(key=label, label=f"{label} (n={len(curves)})", steps=steps, mean=mean, std=np.sqrt(spread), n_runs=len(curves))


def build_curves(runs: Sequence[Run], metric: str, group_by: Sequence[str] | None = None, smooth: int = 1) -> list[Curve]:
    """One curve per run (``group_by`` None) or one mean curve per group of runs sharing those labels."""
    with_metric, _ = split_by_metric(runs, metric)
    if not group_by:
        return [run_curve(run, metric, smooth) for run in with_metric]
    groups = group_runs(with_metric, group_by)
    return [mean_curve(group_name(key, group_by), members, metric, smooth) for key, members in groups.items()]


def draw_curves(ax: Axes, curves: Sequence[Curve], band: bool, ylabel: str, colors: Mapping[str, str] | None = None) -> bool:
    """Draw the curves on ``ax``; with ``band``, shade mean ± std for curves that have a spread.

    ``colors`` maps a curve's ``key`` to a colour (so a method keeps its colour across panels and
    figures, see :func:`group_colors`); curves sharing a colour differ in line style. A band is clipped
    to the metric's range (:func:`metric_range`, from ``ylabel``); returns whether any was, for a note.
    """
    bounds = metric_range(ylabel)
    clipped = False
    uses: dict[str, int] = {}
    for curve in curves:
        color = (colors or {}).get(curve.key)
        style = LINESTYLES[uses.get(color or curve.key, 0) % len(LINESTYLES)]
        uses[color or curve.key] = uses.get(color or curve.key, 0) + 1
        marker = "o" if curve.steps.size <= 30 else None  # a few points would barely show as a line
        (line,) = ax.plot(curve.steps, curve.mean, label=curve.label, linewidth=1.4, color=color, linestyle=style, marker=marker, markersize=3)
        if band and curve.std is not None:
            low, high = curve.mean - curve.std, curve.mean + curve.std
            if bounds is not None:
                clipped |= bool(np.any(low < bounds[0]) or np.any(high > bounds[1]))
                low, high = np.clip(low, *bounds), np.clip(high, *bounds)
            ax.fill_between(curve.steps, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers, even on a short run
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return clipped


def clipping_note(metric: str) -> str:
    """The words a title gets when a band of ``metric`` was clipped to its range."""
    low, high = metric_range(metric) or (float("-inf"), float("inf"))
    return f"band clipped to [{low:g}, {high:g}]"


def output_paths(base: Path, formats: Sequence[str] = FIGURE_FORMATS) -> list[Path]:
    """``base`` with each figure extension; a ``.png``/``.svg`` already on ``base`` is replaced."""
    base = Path(base)
    if base.suffix.lower().lstrip(".") in FIGURE_FORMATS:
        base = base.with_suffix("")
    return [base.with_name(f"{base.name}.{fmt}") for fmt in formats]


def ensure_writable(paths: Sequence[Path], overwrite: bool) -> None:
    """Refuse (``OutputExistsError``, listing them) if any path exists and ``overwrite`` is False."""
    existing = [str(p) for p in paths if Path(p).exists()]
    if existing and not overwrite:
        raise OutputExistsError(f"output exists: {', '.join(existing)}; pass --overwrite to replace, or choose another --out")
    for path in paths:
        if Path(path).is_dir():
            raise OutputExistsError(f"output path {path} is a directory")


def save_figure(figure: Figure, paths: Sequence[Path]) -> list[Path]:
    """Write ``figure`` to every path (format from the extension), creating parent folders."""
    for path in paths:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=150, bbox_inches="tight")
    return list(paths)


def effective_window(runs: Sequence[Run], metric: str, smooth: int) -> int:
    """The smoothing window as it acts: ``smooth``, or fewer when no run logged that many points."""
    longest = max((run.metrics.series(metric, finite_only=True)[0].size for run in runs), default=0)
    return max(1, min(smooth, longest))


def has_values(run: Run, metric: str) -> bool:
    """Whether ``run`` logged at least one finite value of ``metric``."""
    return run.metrics.series(metric, finite_only=True)[0].size > 0


def split_by_metric(runs: Sequence[Run], metric: str) -> tuple[list[Run], list[Run]]:
    """(runs with finite values of ``metric``, runs without)."""
    return [r for r in runs if has_values(r, metric)], [r for r in runs if not has_values(r, metric)]


def gd_similarity_figure(
    curves: Sequence[Curve], metric: str = GD_SIMILARITY, band: bool = False, title: str | None = None, colors: Mapping[str, str] | None = None
) -> Figure:
    """A figure of the curves, with GD's similarity (1) as a dashed reference when plotting it; the
    legend below the axes, never over the curves."""
    figure = Figure(figsize=(8.0, 4.5 + 0.22 * (len(curves) + 1) / 2), layout="constrained")
    ax = figure.add_subplot()
    clipped = draw_curves(ax, curves, band=band, ylabel=metric, colors=colors)
    if metric == GD_SIMILARITY:
        ax.axhline(1.0, color="0.4", linestyle="--", linewidth=1.0, label="GD (similarity 1)")
        ax.set_ylabel("GD similarity  cos(JD update, GD update)")
    ax.set_title((title or f"{metric} against training step") + (f" ({clipping_note(metric)})" if clipped else ""), fontsize="medium")
    figure.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=2, fontsize="small")
    return figure


def plot_gd_similarity(
    runs: Sequence[Run],
    out: Path,
    *,
    metric: str = GD_SIMILARITY,
    smooth: int = 1,
    group_by: Sequence[str] | None = None,
    band: bool = False,
    overwrite: bool = False,
    colors: Mapping[str, str] | None = None,
) -> list[Path]:
    """Plot ``metric`` for the runs that logged it and write PNG and SVG next to ``out``.

    With ``band`` and no ``group_by`` the runs are grouped by split and aggregator. Runs without the
    metric are reported on stderr and skipped; ``MissingMetricError`` if none has it. ``colors``
    (default: :func:`group_colors` of ``runs``, skipped ones included) gives each method its colour.
    """
    paths = output_paths(out)
    ensure_writable(paths, overwrite)
    if band and not group_by:
        group_by = DEFAULT_GROUP_BY
    with_metric, without = split_by_metric(runs, metric)
    if without:
        names = ", ".join(f"{r.name} ({r.source}; split={r.split})" for r in without)
        print(f"skipping {len(without)} run(s) without {metric!r}: {names}", file=sys.stderr)
    if not with_metric:
        raise MissingMetricError(
            f"none of the {len(runs)} run(s) logged {metric!r}; GD runs (jd.split=none) and runs with jd.diagnostics=false log no jd/ metrics"
        )
    colors = colors if colors is not None else group_colors(runs, group_by or DEFAULT_GROUP_BY)
    curves = build_curves(with_metric, metric, group_by=group_by, smooth=smooth)
    window = effective_window(with_metric, metric, smooth)
    smoothing = f", trailing mean over {window} logged points" if window > 1 else ""
    title = f"{metric}{smoothing}"
    return save_figure(gd_similarity_figure(curves, metric, band=band, title=title, colors=colors), paths)


def positive_int_arg(text: str) -> int:
    """argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def label_fields_arg(text: str) -> tuple[str, ...]:
    """argparse type: comma-separated run labels (see ``analysis.runs.LABEL_FIELDS``)."""
    try:
        return parse_label_fields(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.plot_gd_similarity",
        description="Plot jd/gd_similarity against the step for runs (run directories, folders holding "
        "runs, glob patterns, or wandb:ENTITY/PROJECT[/RUN_ID|@GROUP]); writes PNG and SVG.",
    )
    parser.add_argument("runs", nargs="+", metavar="RUN_OR_GLOB", help="runs to plot")
    parser.add_argument(
        "--smooth", type=positive_int_arg, default=1, metavar="N", help="trailing mean over N logged points (default 1: no smoothing)"
    )
    parser.add_argument(
        "--group-by",
        type=label_fields_arg,
        default=None,
        metavar="FIELDS",
        help="comma-separated labels (split, aggregator, seed, arch, data, project): one mean line per group instead of one line per run",
    )
    parser.add_argument("--band", action="store_true", help="shade mean ± one std across each group (groups by split,aggregator by default)")
    parser.add_argument("--metric", default=GD_SIMILARITY, help=f"metric key to plot (default {GD_SIMILARITY})")
    parser.add_argument(
        "--out", type=Path, default=Path("gd_similarity"), metavar="PATH_WITHOUT_EXT", help="output path without extension (default ./gd_similarity)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        ensure_writable(output_paths(args.out), args.overwrite)
        runs = load_runs(args.runs)
        written = plot_gd_similarity(
            runs, args.out, metric=args.metric, smooth=args.smooth, group_by=args.group_by, band=args.band, overwrite=args.overwrite
        )
    except (AnalysisError, WandbUnavailableError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
