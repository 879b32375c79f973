"""Compare runs per (split, method): summary with 95% intervals, differences against GD, learning curves.

    python -m analysis.compare runs/sweep1 --out reports/sweep1 --html

Every group's cell is the mean over its runs (usually its seeds) of one number per run, with its 95%
t interval (``analysis.stats``) and, where only some runs of the group logged the metric, how many
did; the CSV adds the sample standard deviation. Columns appear for the metrics at least one run
logged (eval exact accuracy or ARC pass@2, whichever the runs have). Each group's outcomes are also
compared with the baseline group (the first GD group, or ``--baseline``): the difference with its 95%
interval and p-value, paired by seed where the seeds match (paired t), else Welch's t. Writes
``summary.md``, ``summary.csv``, ``differences.csv``, ``learning_curves.png``/``.svg`` and, with
``--html``, ``report.html`` (self-contained); with ``--wandb-report ENTITY/PROJECT`` it also publishes a
W&B report when W&B is online and ``wandb-workspaces`` is installed, and otherwise says why not.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from analysis.plot_gd_similarity import (
    GD_SIMILARITY,
    build_curves,
    clipping_note,
    draw_curves,
    effective_window,
    ensure_writable,
    group_colors,
    label_fields_arg,
    positive_int_arg,
    save_figure,
)
from analysis.report import Image, Paragraph, Section, Table, figure_png, render_html
from analysis.runs import DEFAULT_GROUP_BY, FINISHED, AnalysisError, Run, group_name, group_runs, label_sort_key
from analysis.sources import load_runs
from analysis.stats import CONFIDENCE, Difference, difference, mean_interval
from analysis.wandb_source import WandbUnavailableError, create_wandb_report, parse_wandb_source
from dataset.atomic import write_failure
from training.numerics import numerics_differences

SUMMARY_MARKDOWN = "summary.md"
SUMMARY_CSV = "summary.csv"
DIFFERENCES_CSV = "differences.csv"
CURVES_BASENAME = "learning_curves"
HTML_REPORT = "report.html"

# Metrics drawn as learning curves, in panel order, when at least one run logged them.
CURVE_METRICS = ("train/lm_loss", "eval/exact_accuracy", "ARC/pass@2", GD_SIMILARITY, "jd/conflict_fraction")


def _last(values: np.ndarray) -> float:
    return float(values[-1])


@dataclass(frozen=True)
class Statistic:
    """One number per run, computed from one metric's logged series.

    ``finite_only`` drops NaN/inf values before reducing; the final value keeps them, so a run that
    diverged shows ``nan`` rather than an earlier loss.
    """

    column: str
    key: str
    reduce: Callable[[np.ndarray], float]
    finite_only: bool
    description: str

    def of(self, run: Run) -> float | None:
        """This statistic for ``run``; None if the run never logged ``key`` (NaN if it logged no finite value)."""
        if self.key not in run.metrics:
            return None
        _, values = run.metrics.series(self.key, finite_only=self.finite_only)
        return float(self.reduce(values)) if values.size else math.nan


STATISTICS = (
    Statistic("final_eval_exact_accuracy", "eval/exact_accuracy", _last, False, "eval/exact_accuracy at the run's last evaluation"),
    Statistic("best_eval_exact_accuracy", "eval/exact_accuracy", np.max, True, "highest eval/exact_accuracy over the run's evaluations"),
    Statistic("final_arc_pass@2", "ARC/pass@2", _last, False, "ARC/pass@2 at the run's last evaluation"),
    Statistic("best_arc_pass@2", "ARC/pass@2", np.max, True, "highest ARC/pass@2 over the run's evaluations"),
    Statistic("final_train_lm_loss", "train/lm_loss", _last, False, "train/lm_loss at the last logged step"),
    Statistic("mean_gd_similarity", GD_SIMILARITY, np.mean, True, "mean of jd/gd_similarity over logged steps"),
    Statistic("min_gd_similarity", GD_SIMILARITY, np.min, True, "lowest jd/gd_similarity over logged steps"),
    Statistic("mean_conflict_fraction", "jd/conflict_fraction", np.mean, True, "mean of jd/conflict_fraction over logged steps"),
    Statistic("median_step_time_s", "train/step_time_s", np.median, True, "median of train/step_time_s (seconds per optimizer step)"),
    Statistic("train_time_s", "train/step_time_s", np.sum, True, "sum of train/step_time_s: the run's training time, evaluation excluded"),
)
# The statistics that measure what a method achieved: each is compared with the baseline group.
OUTCOMES = ("final_eval_exact_accuracy", "best_eval_exact_accuracy", "final_arc_pass@2", "best_arc_pass@2", "final_train_lm_loss")


@dataclass(frozen=True)
class Cell:
    """A statistic over a group: mean, sample std and 95% interval (None for one value), how many runs had it."""

    mean: float
    std: float | None
    n: int
    low: float | None = None
    high: float | None = None


@dataclass(frozen=True)
class GroupSummary:
    key: tuple[str, ...]
    runs: list[Run]
    cells: dict[str, Cell | None]
    values: dict[str, dict[object, float]]  # per statistic: seed (or run index when seeds repeat) -> value

    @property
    def seeds(self) -> list[str]:
        return sorted((r.label("seed") for r in self.runs), key=label_sort_key)


def cell_of(values: Sequence[float]) -> Cell | None:
    """Mean, sample standard deviation and 95% t interval of the values (None when there are none)."""
    if not values:
        return None
    array = np.asarray(values, dtype=np.float64)
    std = float(np.std(array, ddof=1)) if array.size > 1 else None
    interval = mean_interval(array.tolist())
    return Cell(mean=interval.mean, std=std, n=int(array.size), low=interval.low, high=interval.high)


def _values_by_seed(members: Sequence[Run], statistic: Statistic) -> dict[object, float]:
    """One value per run, keyed by seed so groups pair up; by run index when the group repeats a seed."""
    pairs = [(run.label("seed"), value) for run in members if (value := statistic.of(run)) is not None]
    seeds = [seed for seed, _ in pairs]
    if len(set(seeds)) == len(seeds) and "?" not in seeds:
        return dict(pairs)
    return {("run", index): value for index, (_, value) in enumerate(pairs)}


def present_statistics(runs: Sequence[Run]) -> list[Statistic]:
    """The statistics whose metric at least one run logged."""
    return [s for s in STATISTICS if any(s.key in run.metrics for run in runs)]


def summarize(runs: Sequence[Run], group_by: Sequence[str] = DEFAULT_GROUP_BY, statistics: Sequence[Statistic] | None = None) -> list[GroupSummary]:
    """One summary per group of runs sharing the labels ``group_by`` (GD first)."""
    statistics = present_statistics(runs) if statistics is None else statistics
    summaries = []
    for key, members in group_runs(runs, group_by).items():
        values = {s.column: _values_by_seed(members, s) for s in statistics}
        cells = {column: cell_of(list(by_seed.values())) for column, by_seed in values.items()}
        summaries.append(GroupSummary(key=key, runs=members, cells=cells, values=values))
    return summaries


@dataclass(frozen=True)
class Comparison:
    """One group's outcome against the baseline group's."""

    group: GroupSummary
    column: str
    result: Difference


def baseline_group(summaries: Sequence[GroupSummary], group_by: Sequence[str], name: str | None = None) -> GroupSummary | None:
    """The group named ``name`` (its legend text), else the first group of GD runs; None if there is none."""
    if name is not None:
        for summary in summaries:
            if group_name(summary.key, group_by) == name:
                return summary
        known = ", ".join(repr(group_name(s.key, group_by)) for s in summaries)
        raise AnalysisError(f"no group named {name!r} to use as the baseline; the groups: {known}")
    return next((s for s in summaries if all(run.is_gd for run in s.runs)), None)


def compare_to_baseline(summaries: Sequence[GroupSummary], baseline: GroupSummary, statistics: Sequence[Statistic]) -> list[Comparison]:
    """Every other group's outcomes (``OUTCOMES``) minus the baseline's, paired by seed where possible."""
    columns = [s.column for s in statistics if s.column in OUTCOMES]
    comparisons = []
    for summary in summaries:
        if summary is baseline:
            continue
        for column in columns:
            ours, theirs = summary.values[column], baseline.values[column]
            if ours and theirs:
                comparisons.append(Comparison(summary, column, difference(ours, theirs)))
    return comparisons


def format_number(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.4g}"


def format_interval(low: float | None, high: float | None) -> str:
    return "" if low is None or high is None else f" [{format_number(low)}, {format_number(high)}]"


def format_cell(cell: Cell | None, n_runs: int) -> str:
    """``mean [low, high]`` (``mean`` alone for one run), ``(n=k)`` when only k of the group's runs had it."""
    if cell is None:
        return "—"
    text = format_number(cell.mean) + format_interval(cell.low, cell.high)
    if cell.n < n_runs:
        text += f" (n={cell.n})"
    return text


def table_rows(summaries: Sequence[GroupSummary], group_by: Sequence[str], statistics: Sequence[Statistic]) -> tuple[list[str], list[list[str]]]:
    """Header and formatted rows shared by the Markdown and HTML tables."""
    header = [*group_by, "n", "seeds", *(s.column for s in statistics)]
    rows = []
    for summary in summaries:
        n_runs = len(summary.runs)
        rows.append([*summary.key, str(n_runs), ",".join(summary.seeds), *(format_cell(summary.cells[s.column], n_runs) for s in statistics)])
    return header, rows


def difference_rows(comparisons: Sequence[Comparison], group_by: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    """Header and formatted rows of the differences against the baseline."""
    header = [*group_by, "outcome", "n", "difference [95% CI]", "p", "test"]
    rows = []
    for c in comparisons:
        r = c.result
        n = str(r.n) if r.test == "paired" else f"{r.n} vs {r.n_baseline}"
        p = "—" if r.p_value is None else f"{r.p_value:.3g}"
        rows.append(
            [
                *c.group.key,
                c.column,
                n,
                format_number(r.estimate) + format_interval(r.low, r.high),
                p,
                "paired t (by seed)" if r.test == "paired" else "Welch t",
            ]
        )
    return header, rows


def write_differences_csv(path: Path, comparisons: Sequence[Comparison], group_by: Sequence[str], baseline: GroupSummary | None) -> None:
    """One row per (group, outcome): the difference to the baseline at full precision (empty when unknown)."""

    def number(value: float | None) -> str:
        return "" if value is None else repr(value)

    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow([*group_by, "baseline", "outcome", "difference", "ci_low", "ci_high", "p_value", "test", "n", "n_baseline"])
        name = "" if baseline is None else group_name(baseline.key, group_by)
        for c in comparisons:
            r = c.result
            writer.writerow(
                [*c.group.key, name, c.column, repr(r.estimate), number(r.low), number(r.high), number(r.p_value), r.test, r.n, r.n_baseline]
            )


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *(line(r) for r in rows)])


def _run_rows(runs: Sequence[Run], group_by: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    header = ["run", *group_by, "seed", "final step", "status", "source"]
    rows = [[r.name, *r.labels(group_by), r.label("seed"), "?" if r.final_step is None else str(r.final_step), r.status, r.source] for r in runs]
    return header, rows


CELL_NOTE = (
    f"Each cell: mean over the group's runs [{CONFIDENCE:.0%} t interval over them]; (n=k) when only k runs "
    "of the group logged the metric; — when none did."
)


def differences_note(baseline: GroupSummary | None, group_by: Sequence[str]) -> str:
    if baseline is None:
        return "No group of GD runs to compare with (give --baseline GROUP)."
    return (
        f"Each group minus the baseline {group_name(baseline.key, group_by)!r}: the mean difference with "
        f"its {CONFIDENCE:.0%} interval and two-sided p-value; paired by seed (paired t over the seeds both "
        "have) when at least two seeds match, else Welch's t over the two groups' runs."
    )


def to_markdown(
    summaries: Sequence[GroupSummary],
    runs: Sequence[Run],
    group_by: Sequence[str],
    statistics: Sequence[Statistic],
    comparisons: Sequence[Comparison] = (),
    baseline: GroupSummary | None = None,
) -> str:
    """The comparison as a Markdown document: the table, the differences, what each column means, the runs."""
    header, rows = table_rows(summaries, group_by, statistics)
    diff_header, diff_rows = difference_rows(comparisons, group_by)
    run_header, run_rows = _run_rows(runs, group_by)
    legend = "\n".join(f"- `{s.column}`: {s.description}" for s in statistics)
    differences = (
        f"{differences_note(baseline, group_by)}\n\n{_markdown_table(diff_header, diff_rows)}" if diff_rows else differences_note(baseline, group_by)
    )
    return (
        f"# Comparison of {len(runs)} run(s) by {', '.join(group_by)}\n\n{CELL_NOTE}\n\n"
        f"{_markdown_table(header, rows)}\n\n## Differences against the baseline\n\n{differences}\n\n"
        f"## Columns\n\n{legend}\n\n## Runs\n\n{_markdown_table(run_header, run_rows)}\n"
    )


def write_csv(path: Path, summaries: Sequence[GroupSummary], group_by: Sequence[str], statistics: Sequence[Statistic]) -> None:
    """One row per group: labels, n_runs, seeds, then per column ``<c>``, ``<c>_std``, ``<c>_n``, ``<c>_ci_low``, ``<c>_ci_high``.

    Numbers are written at full precision; a missing value is an empty field.
    """
    header = [*group_by, "n_runs", "seeds"]
    for statistic in statistics:
        c = statistic.column
        header += [c, f"{c}_std", f"{c}_n", f"{c}_ci_low", f"{c}_ci_high"]
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for summary in summaries:
            row: list[str] = [*summary.key, str(len(summary.runs)), " ".join(summary.seeds)]
            for statistic in statistics:
                cell = summary.cells[statistic.column]
                if cell is None:
                    row += ["", "", "0", "", ""]
                else:
                    row += [
                        repr(cell.mean),
                        "" if cell.std is None else repr(cell.std),
                        str(cell.n),
                        "" if cell.low is None else repr(cell.low),
                        "" if cell.high is None else repr(cell.high),
                    ]
            writer.writerow(row)


def auto_window(runs: Sequence[Run], metric: str) -> int:
    """Smoothing for a panel when none is asked: per-step metrics over 1/50 of their points, evaluations none."""
    if metric.startswith(("eval/", "ARC/")):
        return 1
    longest = max((run.metrics.series(metric, finite_only=True)[0].size for run in runs), default=0)
    return max(1, longest // 50)


def learning_curves_figure(runs: Sequence[Run], group_by: Sequence[str], smooth: int | None = None) -> Figure:
    """Panels (three per row), one per logged metric of ``CURVE_METRICS``: mean ± std per group.

    ``smooth`` is the trailing-mean window for every panel; None picks one per panel (``auto_window``).
    Each panel's title says the window it used.
    """
    metrics = [m for m in CURVE_METRICS if any(m in run.metrics for run in runs)]
    if not metrics:
        raise AnalysisError(f"no run logged any of {', '.join(CURVE_METRICS)}; nothing to plot")
    names = [group_name(key, group_by) for key in group_runs(runs, group_by)]
    colors = group_colors(runs, group_by)
    columns = min(len(metrics), 3)
    rows = math.ceil(len(metrics) / columns)
    figure = Figure(figsize=(4.4 * columns, 3.4 * rows + 0.9), layout="constrained")
    figure.suptitle(
        f"Learning curves: mean over each group's runs (band: ± one standard deviation), {len(runs)} run(s) by {', '.join(group_by)}",
        fontsize="medium",
    )
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax in axes[len(metrics) :]:
        ax.set_visible(False)
    for ax, metric in zip(axes, metrics):
        window = auto_window(runs, metric) if smooth is None else effective_window(runs, metric, smooth)
        clipped = draw_curves(ax, build_curves(runs, metric, group_by=group_by, smooth=window), band=True, ylabel=metric, colors=colors)
        notes = ([f"trailing mean over {window} points"] if window > 1 else []) + ([clipping_note(metric)] if clipped else [])
        ax.set_title(metric + (f" ({'; '.join(notes)})" if notes else ""), fontsize="small")
    handles = [Line2D([], [], color=colors[name], label=name) for name in names]
    figure.legend(handles=handles, loc="outside lower center", ncols=min(len(names), 3), fontsize="small")
    return figure


def output_files(out_dir: Path, html: bool) -> list[Path]:
    names = [SUMMARY_MARKDOWN, SUMMARY_CSV, DIFFERENCES_CSV, f"{CURVES_BASENAME}.png", f"{CURVES_BASENAME}.svg"]
    return [Path(out_dir) / name for name in names + ([HTML_REPORT] if html else [])]


def warn_repeated_seeds(summaries: Sequence[GroupSummary], group_by: Sequence[str]) -> None:
    """Say on stderr when a group holds several runs with the same seed (e.g. GD swept over aggregators)."""
    for summary in summaries:
        seeds = [r.label("seed") for r in summary.runs]
        repeated = sorted({s for s in seeds if seeds.count(s) > 1})
        if repeated:
            print(
                f"warning: group {group_name(summary.key, group_by)!r} has several runs with seed(s) "
                f"{', '.join(repeated)}; they are averaged as if independent",
                file=sys.stderr,
            )


def warn_numerics(runs: Sequence[Run]) -> None:
    """Warn when the runs differ in what changes numbers besides their config (threads, device, dtype, versions)."""
    differences = numerics_differences([run.config.get("numerics") for run in runs])
    if differences:
        print(
            f"warning: the compared runs differ in what changes their numbers besides the config ({'; '.join(differences)}); "
            "a difference between groups may partly be theirs"
        )


def warn_unfinished(summaries: Sequence[GroupSummary], group_by: Sequence[str]) -> None:
    """Say on stderr when a group averages runs that did not finish (stopped, failed, still running)."""
    for summary in summaries:
        unfinished = [r for r in summary.runs if r.status != FINISHED]
        if unfinished:
            states = ", ".join(f"{r.name}: {r.status}" for r in unfinished)
            print(
                f"warning: group {group_name(summary.key, group_by)!r} averages {len(unfinished)} run(s) that "
                f"did not finish with {len(summary.runs) - len(unfinished)} finished one(s) ({states})",
                file=sys.stderr,
            )


def compare(
    runs: Sequence[Run],
    out_dir: Path,
    *,
    group_by: Sequence[str] = DEFAULT_GROUP_BY,
    html: bool = False,
    smooth: int | None = None,
    overwrite: bool = False,
    baseline: str | None = None,
) -> list[Path]:
    """Write the summary and differences (Markdown, CSV), the learning curves (PNG, SVG), optionally HTML."""
    out_dir = Path(out_dir)
    paths = output_files(out_dir, html)
    ensure_writable(paths, overwrite)
    if not runs:
        raise AnalysisError("no runs to compare")
    statistics = present_statistics(runs)
    summaries = summarize(runs, group_by, statistics)
    base = baseline_group(summaries, group_by, baseline)
    comparisons = [] if base is None else compare_to_baseline(summaries, base, statistics)
    warn_repeated_seeds(summaries, group_by)
    warn_unfinished(summaries, group_by)
    warn_numerics(runs)
    existed = {path for path in paths if path.exists()}
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        markdown_path, csv_path, differences_path, png_path, svg_path = paths[:5]
        markdown_path.write_text(to_markdown(summaries, runs, group_by, statistics, comparisons, base), encoding="utf-8")
        write_csv(csv_path, summaries, group_by, statistics)
        write_differences_csv(differences_path, comparisons, group_by, base)
        figure = learning_curves_figure(runs, group_by, smooth)
        save_figure(figure, [png_path, svg_path])
        if html:
            header, rows = table_rows(summaries, group_by, statistics)
            diff_header, diff_rows = difference_rows(comparisons, group_by)
            run_header, run_rows = _run_rows(runs, group_by)
            sections: list[Section] = [
                Paragraph(f"{len(runs)} run(s) in {len(summaries)} group(s) by {', '.join(group_by)}. {CELL_NOTE}"),
                Table("Summary", header, rows, text_columns=len(group_by) + 2, note=" ".join(f"{s.column}: {s.description}." for s in statistics)),
                Table(
                    "Differences against the baseline", diff_header, diff_rows, text_columns=len(group_by) + 1, note=differences_note(base, group_by)
                ),
                Image("Learning curves", figure_png(figure), caption="Mean over each group's runs; the band is ± one standard deviation."),
                Table("Runs", run_header, run_rows, text_columns=len(run_header)),
            ]
            paths[5].write_text(render_html("Run comparison", sections), encoding="utf-8")
    except OSError as error:  # a full disk, a read-only folder: no half-written report left behind
        for path in paths:
            if path not in existed:
                path.unlink(missing_ok=True)
        where = out_dir if out_dir.exists() else out_dir.parent
        raise AnalysisError(f"cannot write the comparison into {out_dir}: {write_failure(where, error)}; no half-written file was left") from None
    return paths


def _wandb_project(text: str) -> str:
    """argparse type: a W&B ``ENTITY/PROJECT``."""
    try:
        source = parse_wandb_source(text)
    except ValueError:
        source = None
    if source is None or source.run_id is not None or source.group is not None:
        raise argparse.ArgumentTypeError(f"expected ENTITY/PROJECT (e.g. my-team/trm-jd), got {text!r}")
    return source.path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.compare",
        description="Compare runs grouped by split and aggregator: summary table (Markdown, CSV), learning "
        "curves (PNG, SVG), optional HTML report and W&B report.",
    )
    parser.add_argument(
        "runs",
        nargs="+",
        metavar="RUNS",
        help="run directories, folders holding runs (e.g. runs/sweep1), glob patterns, or wandb:ENTITY/PROJECT[/RUN_ID|@GROUP]",
    )
    parser.add_argument("--out", type=Path, default=Path("comparison"), metavar="DIR", help="output folder (default ./comparison)")
    parser.add_argument(
        "--group-by",
        type=label_fields_arg,
        default=DEFAULT_GROUP_BY,
        metavar="FIELDS",
        help="comma-separated labels to group by (default split,method): split, method, aggregator, seed, "
        "epochs, arch, data, project, or any config key a sweep varied (lr, arch.H_cycles, ...)",
    )
    parser.add_argument(
        "--smooth",
        type=positive_int_arg,
        default=None,
        metavar="N",
        help="trailing mean over N logged points in every learning-curve panel (default: "
        "per-step metrics over 1/50 of their points, evaluations unsmoothed)",
    )
    parser.add_argument(
        "--baseline", default=None, metavar="GROUP", help="the group the others are compared with, by its legend text (default: the first GD group)"
    )
    parser.add_argument("--html", action="store_true", help="also write a self-contained report.html")
    parser.add_argument(
        "--wandb-report",
        type=_wandb_project,
        default=None,
        metavar="ENTITY/PROJECT",
        help="also publish a W&B report there (needs W&B online and wandb-workspaces)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        ensure_writable(output_files(args.out, args.html), args.overwrite)
        runs = load_runs(args.runs)
        written = compare(
            runs, args.out, group_by=args.group_by, html=args.html, smooth=args.smooth, overwrite=args.overwrite, baseline=args.baseline
        )
    except (AnalysisError, WandbUnavailableError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path}")
    if args.wandb_report is not None:
        metrics = [m for m in CURVE_METRICS if any(m in run.metrics for run in runs)]
        try:
            url = create_wandb_report(args.wandb_report, runs, metrics, title="Run comparison")
        except WandbUnavailableError as error:
            print(f"W&B report not created: {error}", file=sys.stderr)
        else:
            print(f"W&B report: {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
