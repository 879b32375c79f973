"""Compare runs per (split, aggregator): a summary table (Markdown and CSV), learning curves, an HTML report.

    python -m analysis.compare runs/sweep1 --out reports/sweep1 --html

Every group's cell is the mean over its runs (usually its seeds) of one number per run, with the
sample standard deviation and, where only some runs of the group logged the metric, how many did.
Columns appear for the metrics at least one run logged (eval exact accuracy or ARC pass@2, whichever
the runs have). Writes ``summary.md``, ``summary.csv``, ``learning_curves.png``/``.svg`` and, with
``--html``, ``report.html`` (self-contained); with ``--wandb-report ENTITY/PROJECT`` it also publishes a
W&B report when W&B is online and ``wandb-workspaces`` is installed, and otherwise says why not.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from analysis.plot_gd_similarity import (GD_SIMILARITY, build_curves, draw_curves, ensure_writable,
                                         label_fields_arg, positive_int_arg, save_figure)
from analysis.report import Image, Paragraph, Table, figure_png, render_html
from analysis.runs import (DEFAULT_GROUP_BY, AnalysisError, Run, group_name, group_runs, label_sort_key,
                           load_runs)
from analysis.wandb_source import WandbUnavailableError, create_wandb_report, parse_wandb_source

SUMMARY_MARKDOWN = "summary.md"
SUMMARY_CSV = "summary.csv"
CURVES_BASENAME = "learning_curves"
HTML_REPORT = "report.html"

# Metrics drawn as learning curves, in panel order, when at least one run logged them.
CURVE_METRICS = ("train/lm_loss", "eval/exact_accuracy", "ARC/pass@2", GD_SIMILARITY, "jd/conflict_fraction")
_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink",
           "tab:gray", "tab:olive", "tab:cyan")


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
    Statistic("final_eval_exact_accuracy", "eval/exact_accuracy", _last, False,
              "eval/exact_accuracy at the run's last evaluation"),
    Statistic("best_eval_exact_accuracy", "eval/exact_accuracy", np.max, True,
              "highest eval/exact_accuracy over the run's evaluations"),
    Statistic("final_arc_pass@2", "ARC/pass@2", _last, False, "ARC/pass@2 at the run's last evaluation"),
    Statistic("best_arc_pass@2", "ARC/pass@2", np.max, True, "highest ARC/pass@2 over the run's evaluations"),
    Statistic("final_train_lm_loss", "train/lm_loss", _last, False, "train/lm_loss at the last logged step"),
    Statistic("mean_gd_similarity", GD_SIMILARITY, np.mean, True, "mean of jd/gd_similarity over logged steps"),
    Statistic("min_gd_similarity", GD_SIMILARITY, np.min, True, "lowest jd/gd_similarity over logged steps"),
    Statistic("mean_conflict_fraction", "jd/conflict_fraction", np.mean, True,
              "mean of jd/conflict_fraction over logged steps"),
    Statistic("median_step_time_s", "train/step_time_s", np.median, True,
              "median of train/step_time_s (seconds per optimizer step)"),
)


@dataclass(frozen=True)
class Cell:
    """A statistic over a group: mean, sample std (None for one value) and how many runs had it."""

    mean: float
    std: float | None
    n: int


@dataclass(frozen=True)
class GroupSummary:
    key: tuple[str, ...]
    runs: list[Run]
    cells: dict[str, Cell | None]

    @property
    def seeds(self) -> list[str]:
        return sorted((r.label("seed") for r in self.runs), key=label_sort_key)


def cell_of(values: Sequence[float]) -> Cell | None:
    """Mean and sample standard deviation of the values (None when there are none)."""
    if not values:
        return None
    array = np.asarray(values, dtype=np.float64)
    std = float(np.std(array, ddof=1)) if array.size > 1 else None
    return Cell(mean=float(np.mean(array)), std=std, n=int(array.size))


def present_statistics(runs: Sequence[Run]) -> list[Statistic]:
    """The statistics whose metric at least one run logged."""
    return [s for s in STATISTICS if any(s.key in run.metrics for run in runs)]


def summarize(runs: Sequence[Run], group_by: Sequence[str] = DEFAULT_GROUP_BY,
              statistics: Sequence[Statistic] | None = None) -> list[GroupSummary]:
    """One summary per group of runs sharing the labels ``group_by`` (GD first)."""
    statistics = present_statistics(runs) if statistics is None else statistics
    summaries = []
    for key, members in group_runs(runs, group_by).items():
        cells = {}
        for statistic in statistics:
            values = [v for v in (statistic.of(run) for run in members) if v is not None]
            cells[statistic.column] = cell_of(values)
        summaries.append(GroupSummary(key=key, runs=members, cells=cells))
    return summaries


def format_number(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.4g}"


def format_cell(cell: Cell | None, n_runs: int) -> str:
    """``mean ± std`` (``mean`` alone for one run), ``(n=k)`` when only k of the group's runs had it."""
    if cell is None:
        return "—"
    text = format_number(cell.mean)
    if cell.std is not None:
        text += f" ± {format_number(cell.std)}"
    if cell.n < n_runs:
        text += f" (n={cell.n})"
    return text


def table_rows(summaries: Sequence[GroupSummary], group_by: Sequence[str],
               statistics: Sequence[Statistic]) -> tuple[list[str], list[list[str]]]:
    """Header and formatted rows shared by the Markdown and HTML tables."""
    header = [*group_by, "n", "seeds", *(s.column for s in statistics)]
    rows = []
    for summary in summaries:
        n_runs = len(summary.runs)
        rows.append([*summary.key, str(n_runs), ",".join(summary.seeds),
                     *(format_cell(summary.cells[s.column], n_runs) for s in statistics)])
    return header, rows


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *(line(r) for r in rows)])


def _run_rows(runs: Sequence[Run], group_by: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    header = ["run", *group_by, "seed", "final step", "status", "source"]
    rows = [[r.name, *r.labels(group_by), r.label("seed"),
             "?" if r.final_step is None else str(r.final_step), r.status, r.source] for r in runs]
    return header, rows


def to_markdown(summaries: Sequence[GroupSummary], runs: Sequence[Run], group_by: Sequence[str],
                statistics: Sequence[Statistic]) -> str:
    """The comparison as a Markdown document: the table, what each column means, the runs."""
    header, rows = table_rows(summaries, group_by, statistics)
    run_header, run_rows = _run_rows(runs, group_by)
    legend = "\n".join(f"- `{s.column}`: {s.description}" for s in statistics)
    return (f"# Comparison of {len(runs)} run(s) by {', '.join(group_by)}\n\n"
            "Each cell: mean over the group's runs ± sample standard deviation; `(n=k)` when only k runs "
            "of the group logged the metric; — when none did.\n\n"
            f"{_markdown_table(header, rows)}\n\n## Columns\n\n{legend}\n\n"
            f"## Runs\n\n{_markdown_table(run_header, run_rows)}\n")


def write_csv(path: Path, summaries: Sequence[GroupSummary], group_by: Sequence[str],
              statistics: Sequence[Statistic]) -> None:
    """One row per group: labels, n_runs, seeds, then ``<column>``, ``<column>_std``, ``<column>_n``.

    Numbers are written at full precision; a missing value is an empty field.
    """
    header = [*group_by, "n_runs", "seeds"]
    for statistic in statistics:
        header += [statistic.column, f"{statistic.column}_std", f"{statistic.column}_n"]
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for summary in summaries:
            row: list[str] = [*summary.key, str(len(summary.runs)), " ".join(summary.seeds)]
            for statistic in statistics:
                cell = summary.cells[statistic.column]
                if cell is None:
                    row += ["", "", "0"]
                else:
                    row += [repr(cell.mean), "" if cell.std is None else repr(cell.std), str(cell.n)]
            writer.writerow(row)


def learning_curves_figure(runs: Sequence[Run], group_by: Sequence[str], smooth: int = 1) -> Figure:
    """Panels side by side (three per row), one per logged metric of ``CURVE_METRICS``: mean ± std per group."""
    metrics = [m for m in CURVE_METRICS if any(m in run.metrics for run in runs)]
    if not metrics:
        raise AnalysisError(f"no run logged any of {', '.join(CURVE_METRICS)}; nothing to plot")
    names = [group_name(key, group_by) for key in group_runs(runs, group_by)]
    colors = {name: _COLORS[i % len(_COLORS)] for i, name in enumerate(names)}
    columns = min(len(metrics), 3)
    rows = math.ceil(len(metrics) / columns)
    figure = Figure(figsize=(4.4 * columns, 3.4 * rows + 0.5), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    for ax, metric in zip(axes, metrics):
        draw_curves(ax, build_curves(runs, metric, group_by=group_by, smooth=smooth), band=True,
                    ylabel=metric, colors=colors)
        ax.set_title(metric, fontsize="medium")
    handles = [Line2D([], [], color=colors[name], label=name) for name in names]
    figure.legend(handles=handles, loc="outside lower center", ncols=min(len(names), 4), fontsize="small")
    return figure


def output_files(out_dir: Path, html: bool) -> list[Path]:
    names = [SUMMARY_MARKDOWN, SUMMARY_CSV, f"{CURVES_BASENAME}.png", f"{CURVES_BASENAME}.svg"]
    return [Path(out_dir) / name for name in names + ([HTML_REPORT] if html else [])]


def warn_repeated_seeds(summaries: Sequence[GroupSummary], group_by: Sequence[str]) -> None:
    """Say on stderr when a group holds several runs with the same seed (e.g. GD swept over aggregators)."""
    for summary in summaries:
        seeds = [r.label("seed") for r in summary.runs]
        repeated = sorted({s for s in seeds if seeds.count(s) > 1})
        if repeated:
            print(f"warning: group {group_name(summary.key, group_by)!r} has several runs with seed(s) "
                  f"{', '.join(repeated)}; they are averaged as if independent", file=sys.stderr)


def compare(runs: Sequence[Run], out_dir: Path, *, group_by: Sequence[str] = DEFAULT_GROUP_BY,
            html: bool = False, smooth: int = 1, overwrite: bool = False) -> list[Path]:
    """Write the summary table (Markdown, CSV), the learning curves (PNG, SVG) and optionally the HTML report."""
    out_dir = Path(out_dir)
    paths = output_files(out_dir, html)
    ensure_writable(paths, overwrite)
    if not runs:
        raise AnalysisError("no runs to compare")
    statistics = present_statistics(runs)
    summaries = summarize(runs, group_by, statistics)
    warn_repeated_seeds(summaries, group_by)
    out_dir.mkdir(parents=True, exist_ok=True)
    markdown_path, csv_path, png_path, svg_path = paths[:4]
    markdown_path.write_text(to_markdown(summaries, runs, group_by, statistics), encoding="utf-8")
    write_csv(csv_path, summaries, group_by, statistics)
    figure = learning_curves_figure(runs, group_by, smooth)
    save_figure(figure, [png_path, svg_path])
    if html:
        header, rows = table_rows(summaries, group_by, statistics)
        run_header, run_rows = _run_rows(runs, group_by)
        sections = [
            Paragraph(f"{len(runs)} run(s) in {len(summaries)} group(s) by {', '.join(group_by)}. Each cell: mean "
                      "over the group's runs ± sample standard deviation; (n=k) when only k runs of the group "
                      "logged the metric."),
            Table("Summary", header, rows, text_columns=len(group_by) + 2,
                  note=" ".join(f"{s.column}: {s.description}." for s in statistics)),
            Image("Learning curves", figure_png(figure),
                  caption="Mean over each group's runs; the band is ± one standard deviation."),
            Table("Runs", run_header, run_rows, text_columns=len(run_header)),
        ]
        paths[4].write_text(render_html("Run comparison", sections), encoding="utf-8")
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
                    "curves (PNG, SVG), optional HTML report and W&B report.")
    parser.add_argument("runs", nargs="+", metavar="RUNS",
                        help="run directories, folders holding runs (e.g. runs/sweep1), glob patterns, or "
                             "wandb:ENTITY/PROJECT[/RUN_ID|@GROUP]")
    parser.add_argument("--out", type=Path, default=Path("comparison"), metavar="DIR",
                        help="output folder (default ./comparison)")
    parser.add_argument("--group-by", type=label_fields_arg, default=DEFAULT_GROUP_BY, metavar="FIELDS",
                        help="comma-separated labels to group by (default split,aggregator)")
    parser.add_argument("--smooth", type=positive_int_arg, default=1, metavar="N",
                        help="trailing mean over N logged points in the learning curves (default 1)")
    parser.add_argument("--html", action="store_true", help="also write a self-contained report.html")
    parser.add_argument("--wandb-report", type=_wandb_project, default=None, metavar="ENTITY/PROJECT",
                        help="also publish a W&B report there (needs W&B online and wandb-workspaces)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        ensure_writable(output_files(args.out, args.html), args.overwrite)
        runs = load_runs(args.runs)
        written = compare(runs, args.out, group_by=args.group_by, html=args.html, smooth=args.smooth,
                          overwrite=args.overwrite)
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
