"""Run a grid of methods x seeds on one task, then write the comparison report.

    python -m analysis.study --recipe sudoku4x4 --out studies/sudoku4x4 --workers 2 --threads 1

Every (arm, seed) trains with ``pretrain.py`` in ``OUT/runs/ARM/sSEED``; the report (summary with
95% intervals, paired differences against GD, learning curves, GD-similarity figure, HTML) goes to
``OUT/report``. The study resumes: a run whose ``summary.json`` says ``finished`` is not run again, a
run that was stopped half-way continues from its newest checkpoint (``resume=true``), so a long study
can be run in parts (stop it with Ctrl-C, start the same command again). ``--report-only`` rebuilds
the report from the runs there are.

A recipe is plain data: the overrides every run shares, its arms (name, overrides, what it tests) and
its seeds. ``--arms``, ``--seeds`` and ``--set KEY=VALUE`` narrow or adjust it (``--set`` applies to
every run, e.g. ``--set max_steps=50`` for a quick look; the run directories record the values).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from analysis.compare import compare
from analysis.plot_gd_similarity import GD_SIMILARITY, group_colors, plot_gd_similarity, split_by_metric
from analysis.runs import AnalysisError
from analysis.sources import load_runs

RUNS_FOLDER = "runs"
REPORT_FOLDER = "report"
LOGS_FOLDER = "logs"
DATA_FOLDER = "data"
FINISHED = "finished"


@dataclass(frozen=True)
class Arm:
    """One method of a study: its name (the run folder), the overrides that make it, what it asks."""

    name: str
    overrides: tuple[str, ...]
    question: str


@dataclass(frozen=True)
class Recipe:
    """A study: shared overrides, the arms, the seeds and the labels its report groups by."""

    name: str
    description: str
    data: GeneratedSudoku
    base: tuple[str, ...]
    arms: tuple[Arm, ...]
    seeds: tuple[int, ...]
    group_by: tuple[str, ...] = ("split", "method", "epochs")

    def arm(self, name: str) -> Arm:
        for arm in self.arms:
            if arm.name == name:
                return arm
        raise AnalysisError(f"recipe {self.name!r} has no arm {name!r}; its arms: {', '.join(a.name for a in self.arms)}")


# Generated 4x4 Sudoku (2,000 training / 200 held-out puzzles with 8-10 givens, a little easier than the
# demo's 6-9) and the demo's TRM, 18 epochs: there GD is well off both 0 and 1 (about 0.1 held-out exact
# accuracy on a trial seed; the full 120-epoch demo reaches 0.9), so a difference either way can show.
SUDOKU_EPOCHS = 18
# GD given IWRM + UPGrad's wall-clock: a JD step with IWRM + UPGrad measured 1.65x a GD step here (two
# runs at a time, one thread each), so this arm trains 30 epochs; the report's train_time_s column
# shows the budget each arm really used.
TIME_MATCHED_EPOCHS = 30
_IWRM = "jd.split=iwrm_with_q_halt_in"


@dataclass(frozen=True)
class GeneratedSudoku:
    """A generated Sudoku dataset the study builds in ``OUT/data/NAME`` before its first run."""

    name: str
    size: int
    num_train: int
    num_test: int
    min_givens: int
    max_givens: int
    seed: int = 0

    def build(self, data_root: Path) -> Path:
        from dataset.build_sudoku_dataset import build_generated_sudoku

        path = data_root / self.name
        if not path.exists():
            print(f"building {path} ...", flush=True)
            build_generated_sudoku(
                path,
                size=self.size,
                num_train=self.num_train,
                num_test=self.num_test,
                min_givens=self.min_givens,
                max_givens=self.max_givens,
                seed=self.seed,
                progress=False,
            )
        return path


SUDOKU4X4 = Recipe(
    name="sudoku4x4",
    description=f"generated 4x4 Sudoku (8-10 givens), the demo TRM, {SUDOKU_EPOCHS} epochs, held-out exact accuracy every 6 epochs",
    data=GeneratedSudoku("sudoku4x4-givens8to10", size=4, num_train=2000, num_test=200, min_givens=8, max_givens=10),
    base=(f"epochs={SUDOKU_EPOCHS}", "eval_interval=6", "eval_steps=[]", "keep_last=1", "progress_bar=false", "wandb.mode=disabled", "device=cpu"),
    arms=(
        Arm("gd", ("jd.split=none",), "the baseline: plain gradient descent"),
        Arm(
            "gd_time_matched",
            ("jd.split=none", f"epochs={TIME_MATCHED_EPOCHS}"),
            "is JD only more compute? GD given IWRM + UPGrad's wall-clock (more epochs)",
        ),
        Arm("iwrm_upgrad", (_IWRM,), "one objective per puzzle, aggregated by UPGrad"),
        Arm("lm_vs_halt_upgrad", ("jd.split=lm_loss_vs_q_halt_loss",), "answer loss vs halting loss, UPGrad"),
        Arm("pixel10_upgrad", ("jd.split=pixelwise_q_halt_in", "jd.n_groups=10"), "per-cell losses in 10 random buckets, UPGrad"),
        Arm(
            "stack_supervisions_upgrad",
            ("jd.split=stack_supervisions", "jd.supervision_loop=same_batch"),
            "one objective per supervision step (the JD study's loop, 4 steps on one batch), UPGrad",
        ),
        Arm(
            "stack_supervisions_sum",
            ("jd.split=stack_supervisions_and_sum", "jd.supervision_loop=same_batch"),
            "the control of the stack arm: GD on the same loop (the 4 steps' losses summed, one backward)",
        ),
        Arm("iwrm_mgda", (_IWRM, "jd.aggregator=mgda"), "one objective per puzzle, aggregated by MGDA"),
        Arm("iwrm_uw", (_IWRM, "jd.scalarizer=uw"), "one objective per puzzle, weighted by uncertainty weighting"),
        Arm("iwrm_famo", (_IWRM, "jd.scalarizer=famo"), "one objective per puzzle, weighted by FAMO"),
    ),
    seeds=(0, 1, 2, 3, 4),
)

RECIPES = {recipe.name: recipe for recipe in (SUDOKU4X4,)}


@dataclass(frozen=True)
class PlannedRun:
    arm: Arm
    seed: int
    run_dir: Path
    log_file: Path
    overrides: tuple[str, ...]

    @property
    def label(self) -> str:
        return f"{self.arm.name} seed {self.seed}"


def run_status(run_dir: Path) -> str | None:
    """The ``status`` in the run's ``summary.json``; None when the run has not ended (or never started)."""
    try:
        return str(json.loads((run_dir / "summary.json").read_text(encoding="utf-8")).get("status"))
    except (OSError, ValueError):
        return None


def plan_runs(
    recipe: Recipe, out_dir: Path, arms: Sequence[str] | None = None, seeds: Sequence[int] | None = None, extra: Sequence[str] = ()
) -> list[PlannedRun]:
    """Every (arm, seed) of the recipe, seed-major (all arms of seed 0 first: a study cut short stays balanced)."""
    chosen = [recipe.arm(name) for name in arms] if arms else list(recipe.arms)
    runs = []
    for seed in seeds if seeds else recipe.seeds:
        for arm in chosen:
            run_dir = out_dir / RUNS_FOLDER / arm.name / f"s{seed}"
            overrides = (
                *recipe.base,
                f"data_paths=[{out_dir / DATA_FOLDER / recipe.data.name}]",
                *arm.overrides,
                *extra,
                f"seed={seed}",
                f"run_dir={run_dir}",
                f"project_name={recipe.name}",
            )
            log_file = out_dir / LOGS_FOLDER / f"{arm.name}-s{seed}.log"
            runs.append(PlannedRun(arm, seed, run_dir, log_file, overrides))
    return runs


def validate(runs: Sequence[PlannedRun]) -> None:
    """Compose every run's config before anything trains: a bad override fails here, on one line."""
    from pretrain import compose_config
    from training.config import ConfigError

    for run in runs:
        try:
            compose_config(list(run.overrides))
        except ConfigError as error:
            raise AnalysisError(f"{run.label}: {error}") from None


def train(run: PlannedRun, threads: int | None) -> tuple[PlannedRun, int, float]:
    """Train one run in its own process (continuing it when its directory exists); output to its log file."""
    overrides = list(run.overrides) + (["resume=true"] if run.run_dir.exists() else [])
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    run.log_file.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(run.log_file, "a", encoding="utf-8") as log:
        code = subprocess.call([sys.executable, "-m", "pretrain", *overrides], stdout=log, stderr=subprocess.STDOUT, env=env)
    return run, code, time.perf_counter() - start


def run_study(runs: Sequence[PlannedRun], workers: int, threads: int | None) -> list[PlannedRun]:
    """Train every run that has not finished; return the ones that failed."""
    pending = [r for r in runs if run_status(r.run_dir) != FINISHED]
    print(f"{len(runs) - len(pending)} of {len(runs)} run(s) already finished; {len(pending)} to train ({workers} at a time)", flush=True)
    failed = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for done, (run, code, seconds) in enumerate(pool.map(lambda r: train(r, threads), pending), start=1):
            status = run_status(run.run_dir)
            ok = code == 0 and status == FINISHED
            print(f"[{done}/{len(pending)}] {run.label}: {'finished' if ok else f'FAILED (exit {code}, {status})'} in {seconds:.0f} s", flush=True)
            if not ok:
                failed.append(run)
    return failed


def write_report(out_dir: Path, recipe: Recipe) -> list[Path]:
    """The comparison report of every run under ``OUT/runs`` in ``OUT/report`` (replacing an older one)."""
    runs = load_runs([out_dir / RUNS_FOLDER], progress=False)
    report = out_dir / REPORT_FOLDER
    written = compare(runs, report, group_by=recipe.group_by, html=True, overwrite=True)
    jd_runs, _ = split_by_metric(runs, GD_SIMILARITY)
    if jd_runs:
        colors = group_colors(runs, recipe.group_by)  # the learning curves' colours: one per method in every figure
        written += plot_gd_similarity(
            jd_runs, report / "gd_similarity", group_by=recipe.group_by, band=True, smooth=20, overwrite=True, colors=colors
        )
    return written


def _names(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:  # an empty list would mean "all" downstream: never what was typed
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return names


def _seeds(text: str) -> list[int]:
    try:
        return [int(part) for part in _names(text)]
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(f"expected comma-separated integer seeds, got {text!r}") from None


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m analysis.study", description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", required=True, choices=sorted(RECIPES), help="the study to run")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="study folder (runs/ and report/)")
    parser.add_argument("--arms", type=_names, default=None, metavar="A,B", help="only these arms")
    parser.add_argument("--seeds", type=_seeds, default=None, metavar="0,1", help="only these seeds")
    parser.add_argument(
        "--set", dest="extra", action="append", default=[], metavar="KEY=VALUE", help="a pretrain.py override for every run (repeatable)"
    )
    parser.add_argument("--workers", type=_positive, default=1, help="runs trained at once (default 1)")
    parser.add_argument("--threads", type=_positive, default=None, help="torch threads per run (OMP_NUM_THREADS; default: torch's choice)")
    parser.add_argument("--report-only", action="store_true", help="only rebuild the report from the runs there are")
    parser.add_argument("--list", action="store_true", help="print the recipe's runs and their state, then stop")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    recipe = RECIPES[args.recipe]
    try:
        if args.out.exists() and not args.out.is_dir():
            raise AnalysisError(f"--out {args.out} is a file; give a folder (the study's runs/, data/ and report/ go there)")
        for item in args.extra:
            if "=" not in item:
                raise AnalysisError(f"--set expects KEY=VALUE, got {item!r}")
        runs = plan_runs(recipe, args.out, args.arms, args.seeds, args.extra)
        if args.list:
            for run in runs:
                print(f"{run.label:36s} {run_status(run.run_dir) or 'not finished'}  {run.run_dir}")
            return 0
        if not args.report_only:
            validate(runs)
            recipe.data.build(args.out / DATA_FOLDER)
        failed = [] if args.report_only else run_study(runs, args.workers, args.threads)
        written = write_report(args.out, recipe)
    except AnalysisError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # a full disk or a read-only --out while building data or starting runs
        reason = "no space left on the device" if error.errno == errno.ENOSPC else error.strerror
        print(f"error: cannot write into {args.out} ({reason}{f': {error.filename}' if error.filename else ''})", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path}")
    if failed:
        print(f"{len(failed)} run(s) failed (their logs are in {args.out / LOGS_FOLDER}): " + ", ".join(r.label for r in failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
