"""Read training runs into a small, step-indexed form.

A *run directory* is any folder holding a ``metrics.jsonl`` file (one JSON object per logged step,
W&B-style keys) next to the ``config.yaml`` the trainer resolved; ``summary.json`` is optional.
``load_runs`` accepts run directories, parent folders (every run directory below them is found), glob
patterns, and ``wandb:ENTITY/PROJECT[/RUN_ID | @GROUP]`` sources (read through ``analysis.wandb_source``).
"""

from __future__ import annotations

import glob
import gzip
import json
import math
import os
import sys
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

METRICS_FILE = "metrics.jsonl"
METRICS_GZ = "metrics.jsonl.gz"  # an archived run: the same lines, gzip-compressed (read the same way)
CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "summary.json"
WANDB_PREFIX = "wandb:"

GD_SPLIT = "none"
GD_AGGREGATOR = "gd"
UNKNOWN = "?"
FINISHED = "finished"
NO_SUMMARY = "running or killed (no summary.json yet)"
LABEL_FIELDS = ("split", "method", "aggregator", "seed", "epochs", "arch", "data", "project")
DEFAULT_GROUP_BY = ("split", "method")

# Folders inside a run directory (or next to runs) that never hold runs of their own.
_SKIPPED_FOLDERS = frozenset({"wandb", "checkpoints", "__pycache__"})
_GLOB_CHARACTERS = frozenset("*?[")


class AnalysisError(ValueError):
    """Bad input to an analysis command; the message names what is wrong and what is accepted."""


class RunLoadError(AnalysisError):
    """A path, pattern or file that does not hold a readable run; the message names it."""


_NON_FINITE_TEXT = frozenset({"nan", "inf", "+inf", "-inf", "infinity", "+infinity", "-infinity"})


def _as_number(value: Any) -> float | None:
    """A logged value as a float, or None when it is not a number (nor a non-finite number written as text)."""
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value.strip().lower() in _NON_FINITE_TEXT:
        return float(value.strip())
    return None


class MetricTable:
    """Metrics indexed by training step.

    Every key keeps its own sorted ``(steps, values)`` series, so "never logged at this step" and
    "logged as NaN" stay distinct; ``steps`` and ``column`` give the dense table view (one row per
    logged step, NaN where a key was not logged).
    """

    def __init__(self, series: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> None:
        self._series = {key: (np.asarray(s, dtype=np.int64), np.asarray(v, dtype=np.float64)) for key, (s, v) in series.items()}
        all_steps = [s for s, _ in self._series.values()]
        self.steps: np.ndarray = np.unique(np.concatenate(all_steps)) if all_steps else np.zeros(0, dtype=np.int64)

    @classmethod
    def from_records(cls, records: Iterable[Mapping[str, Any]], step_key: str = "step") -> MetricTable:
        """Build a table from logged records, each carrying an integer ``step_key``.

        Records sharing a step are merged (train and eval lines of the same step); when one key is
        logged twice at the same step the later value wins. Non-finite numbers may be written as the
        strings ``"nan"``, ``"inf"``, ``"-inf"`` (JSON has no literal for them); other strings, lists,
        objects and null are ignored; booleans count as 0/1.
        """
        by_key: dict[str, dict[int, float]] = {}
        for record in records:
            step = int(record[step_key])
            for key, value in record.items():
                number = _as_number(value)
                if key != step_key and number is not None:
                    by_key.setdefault(key, {})[step] = number
        series = {}
        for key, values in by_key.items():
            steps = np.array(sorted(values), dtype=np.int64)
            series[key] = (steps, np.array([values[int(s)] for s in steps], dtype=np.float64))
        return cls(series)

    def keys(self) -> list[str]:
        """Every metric key logged at least once, sorted."""
        return sorted(self._series)

    def __contains__(self, key: object) -> bool:
        return key in self._series

    def __len__(self) -> int:
        return int(self.steps.size)

    def series(self, key: str, finite_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """The steps at which ``key`` was logged and its values (empty arrays if never logged)."""
        if key not in self._series:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64)
        steps, values = self._series[key]
        if finite_only:
            keep = np.isfinite(values)
            return steps[keep], values[keep]
        return steps, values

    def column(self, key: str) -> np.ndarray:
        """``key`` aligned with ``self.steps``: NaN where it was not logged."""
        dense = np.full(self.steps.shape, np.nan)
        steps, values = self.series(key)
        dense[np.searchsorted(self.steps, steps)] = values
        return dense

    def last(self, key: str) -> float | None:
        """The value logged at the largest step (NaN stays NaN), or None if never logged."""
        _, values = self.series(key)
        return float(values[-1]) if values.size else None


def _config_value(config: Mapping[str, Any], dotted_key: str) -> Any:
    """``config["a"]["b"]`` for ``"a.b"``; None where any level is missing."""
    node: Any = config
    for part in dotted_key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


@dataclass(frozen=True)
class Run:
    """One training run: where it came from, its resolved config, its metrics, and labels derived from both.

    ``source`` is the run directory for local runs and ``wandb:ENTITY/PROJECT/RUN_ID`` for W&B runs.
    ``default_project`` is the project when the config leaves ``project_name`` unset (the trainer then
    names it after the data folder): the run directory's parent folder, or the W&B group.
    """

    name: str
    source: str
    config: Mapping[str, Any]
    metrics: MetricTable
    summary: Mapping[str, Any] = field(default_factory=dict)
    default_project: str = UNKNOWN

    @property
    def split(self) -> str:
        """``jd.split``; runs whose config has no ``jd`` section are plain GD (``"none"``)."""
        value = _config_value(self.config, "jd.split")
        return GD_SPLIT if value is None else str(value)

    @property
    def is_gd(self) -> bool:
        return self.split == GD_SPLIT

    @property
    def aggregator(self) -> str:
        """``jd.aggregator`` (``upgrad`` when unset), ``"gd"`` for GD runs, ``"-"`` for scalarizer runs."""
        if self.is_gd:
            return GD_AGGREGATOR
        if _config_value(self.config, "jd.scalarizer"):
            return "-"
        value = _config_value(self.config, "jd.aggregator")
        return "upgrad" if value is None else str(value)

    @property
    def method(self) -> str:
        """How the objectives became one update: ``gd`` (also for a split with one objective, such as
        ``stack_supervisions_and_sum``: GD on it), ``aggregator:NAME`` or ``scalarizer:NAME``."""
        from jd.splits import single_objective

        if self.is_gd or (not _config_value(self.config, "jd.scalarizer") and single_objective(self.split)):
            return GD_AGGREGATOR
        scalarizer = _config_value(self.config, "jd.scalarizer")
        return f"scalarizer:{scalarizer}" if scalarizer else f"aggregator:{self.aggregator}"

    @property
    def seed(self) -> int | None:
        value = _config_value(self.config, "seed")
        return None if value is None else int(value)

    @property
    def epochs(self) -> str:
        """``epochs`` as text (a label: e.g. GD at the JD runs' epochs vs GD given their wall-clock); with
        ``max_steps`` set, that bound too (``18, max_steps=50``), so a label says how long the run trained."""
        value = _config_value(self.config, "epochs")
        bound = _config_value(self.config, "max_steps")
        text = UNKNOWN if value is None else str(value)
        return text if bound is None else f"{text}, max_steps={bound}"

    @property
    def arch(self) -> str:
        value = _config_value(self.config, "arch.name")
        return UNKNOWN if value is None else str(value)

    @property
    def data(self) -> str:
        """The data folders' base names joined by ``+`` (``data/sudoku-1k`` -> ``sudoku-1k``)."""
        paths = _config_value(self.config, "data_paths")
        if paths is None:
            return UNKNOWN
        if isinstance(paths, str):
            paths = [paths]
        return "+".join(Path(str(p).rstrip("/")).name for p in paths) or UNKNOWN

    @property
    def project(self) -> str:
        value = _config_value(self.config, "project_name")
        return self.default_project if value is None else str(value)

    @property
    def final_step(self) -> int | None:
        """``summary.json``'s ``final_step``, else the largest logged step, else None."""
        if "final_step" in self.summary:
            return int(self.summary["final_step"])
        return int(self.metrics.steps[-1]) if len(self.metrics) else None

    @property
    def status(self) -> str:
        """``summary.json``'s status (``finished``, ``interrupted by SIGTERM``, ...); a run without one has not ended."""
        return str(self.summary.get("status", NO_SUMMARY))

    def label(self, name: str) -> str:
        """One derived label as text; ``name`` is one of ``LABEL_FIELDS`` or a config key (``lr``, ``arch.H_cycles``)."""
        if name not in LABEL_FIELDS:
            if name not in _config_keys():
                raise AnalysisError(f"unknown run label {name!r}; accepted: {', '.join(LABEL_FIELDS)} or a config key (e.g. lr)")
            value = _config_value(self.config, name)
            return UNKNOWN if value is None else str(value)
        if name == "seed":
            return UNKNOWN if self.seed is None else str(self.seed)
        return str(getattr(self, name))

    def labels(self, names: Sequence[str]) -> tuple[str, ...]:
        return tuple(self.label(n) for n in names)


def _config_keys() -> frozenset[str]:
    """Every dotted key of the training config: each can be a label (a hyperparameter a sweep varied)."""
    from training.config import known_keys

    return frozenset(known_keys())


def parse_label_fields(text: str) -> tuple[str, ...]:
    """Parse ``"split,aggregator"`` (or config keys: ``"method,lr"``) into label names, rejecting unknown or repeated ones."""
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    if not names:
        raise AnalysisError(f"no label names in {text!r}; accepted: {', '.join(LABEL_FIELDS)} or config keys")
    unknown = [n for n in names if n not in LABEL_FIELDS and n not in _config_keys()]
    if unknown:
        raise AnalysisError(f"unknown label(s) {', '.join(unknown)}; accepted: {', '.join(LABEL_FIELDS)} or a config key (e.g. lr, arch.H_cycles)")
    if len(set(names)) != len(names):
        raise AnalysisError(f"a label is repeated in {text!r}")
    return names


def label_sort_key(value: str) -> tuple[int, str]:
    """Sort GD first, unknown last, the rest alphabetically (numbers numerically)."""
    if value in (GD_SPLIT, GD_AGGREGATOR):
        return (0, "")
    if value == UNKNOWN:
        return (3, "")
    if value.lstrip("-").isdigit():
        return (1, f"{int(value):+020d}")
    return (2, value)


def group_runs(runs: Sequence[Run], fields: Sequence[str]) -> dict[tuple[str, ...], list[Run]]:
    """Runs grouped by their labels ``fields``; GD groups first, then in label order."""
    groups: dict[tuple[str, ...], list[Run]] = {}
    for run in runs:
        groups.setdefault(run.labels(fields), []).append(run)
    ordered = sorted(groups, key=lambda key: tuple(label_sort_key(v) for v in key))
    return {key: groups[key] for key in ordered}


def group_name(key: Sequence[str], fields: Sequence[str]) -> str:
    """A short legend text for a group: its label values; the split is dropped for GD groups."""
    pairs = list(zip(fields, key))
    if ("split", GD_SPLIT) in pairs and (("aggregator", GD_AGGREGATOR) in pairs or ("method", GD_AGGREGATOR) in pairs):
        pairs = [(f, v) for f, v in pairs if f != "split"]
    return " / ".join(v if f in ("split", "method", "aggregator", "arch", "data") else f"{f}={v}" for f, v in pairs)


def read_metrics_file(path: Path) -> MetricTable:
    """Parse a ``metrics.jsonl`` file (or a gzip-compressed ``metrics.jsonl.gz``).

    Blank lines are skipped, and so is an unfinished last line (a run still writing); any other line
    that is not a JSON object with an integer ``step`` is an error naming the file and line.
    """
    records = []
    try:
        if path.suffix == ".gz":
            text = gzip.decompress(path.read_bytes()).decode("utf-8")
        else:
            text = path.read_text(encoding="utf-8")
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise RunLoadError(f"{path}: not a readable {'gzip' if path.suffix == '.gz' else 'metrics'} file ({error})") from None
    except UnicodeDecodeError as error:
        raise RunLoadError(f"{path}: not UTF-8 text at byte {error.start} (a corrupted file?); metrics files are JSON lines") from None
    lines = text.splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines) and not text.endswith("\n"):
                print(f"warning: {path}:{number}: skipping an unfinished last line", file=sys.stderr)
                continue
            raise RunLoadError(f"{path}:{number}: not valid JSON ({error.msg})") from error
        if not isinstance(record, dict):
            raise RunLoadError(f"{path}:{number}: expected a JSON object, found {type(record).__name__}")
        step = record.get("step")
        if isinstance(step, bool) or not isinstance(step, (int, float)) or not math.isfinite(step) or int(step) != step:
            raise RunLoadError(f"{path}:{number}: every line needs an integer 'step', found {step!r}")
        records.append(record)
    return MetricTable.from_records(records)


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = OmegaConf.load(path)
    except Exception as error:  # OmegaConf raises several YAML and grammar error types
        raise RunLoadError(f"{path}: not a readable YAML config ({error})") from error
    try:
        container = OmegaConf.to_container(config, resolve=True)
    except Exception:  # an interpolation that needs Hydra's resolvers: keep it unresolved
        container = OmegaConf.to_container(config, resolve=False)
    if not isinstance(container, dict):
        raise RunLoadError(f"{path}: expected a mapping at the top level, found {type(container).__name__}")
    return {str(key): value for key, value in container.items()}


def _read_summary(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise RunLoadError(f"{path}: not valid JSON ({error.msg})") from error
    if not isinstance(summary, dict):
        raise RunLoadError(f"{path}: expected a JSON object, found {type(summary).__name__}")
    return summary


def is_run_dir(path: Path) -> bool:
    return (path / METRICS_FILE).is_file() or (path / METRICS_GZ).is_file()


def metrics_path(path: Path) -> Path:
    """The run directory's metrics file: ``metrics.jsonl``, else ``metrics.jsonl.gz``."""
    plain = path / METRICS_FILE
    return plain if plain.is_file() else path / METRICS_GZ


def load_run_dir(path: Path) -> Run:
    """Read one run directory (``metrics.jsonl`` + ``config.yaml`` [+ ``summary.json``])."""
    path = Path(path)
    if not is_run_dir(path):
        raise RunLoadError(f"{path} is not a run directory: it has no {METRICS_FILE}")
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise RunLoadError(f"run directory {path} has {METRICS_FILE} but no {CONFIG_FILE}; the trainer writes both")
    config = _read_config(config_path)
    name = config.get("run_name") or path.name
    return Run(
        name=str(name),
        source=str(path),
        config=config,
        metrics=read_metrics_file(metrics_path(path)),
        summary=_read_summary(path / SUMMARY_FILE),
        default_project=path.resolve().parent.name or UNKNOWN,
    )


def find_run_dirs(root: Path) -> list[Path]:
    """``root`` itself if it is a run directory, else every run directory below it (sorted).

    Hidden folders and the ``wandb``/``checkpoints`` folders are not searched, and nothing below a run
    directory is.
    """
    root = Path(root)
    if is_run_dir(root):
        return [root]
    found = []
    for folder, subfolders, files in os.walk(root):
        if METRICS_FILE in files or METRICS_GZ in files:
            found.append(Path(folder))
            subfolders.clear()
            continue
        subfolders[:] = sorted(d for d in subfolders if not d.startswith(".") and d not in _SKIPPED_FOLDERS)
    return sorted(found)


def run_dirs_for(item: str) -> list[Path]:
    """The run directories one command-line argument names (a path or a glob pattern)."""
    if _GLOB_CHARACTERS & set(item):
        matches = sorted(glob.glob(item, recursive=True))
        if not matches:
            raise RunLoadError(f"no path matches the pattern {item!r}")
        paths = [Path(m).parent if Path(m).name in (METRICS_FILE, METRICS_GZ) else Path(m) for m in matches]
        dirs = [d for p in paths if p.is_dir() for d in find_run_dirs(p)]
        if not dirs:
            raise RunLoadError(
                f"the pattern {item!r} matches {len(matches)} path(s) but no run directory (a folder with {METRICS_FILE} and {CONFIG_FILE})"
            )
        return dirs
    path = Path(item)
    if not path.exists():
        raise RunLoadError(f"no such file or directory: {item}")
    if path.is_file():
        if path.name in (METRICS_FILE, METRICS_GZ, CONFIG_FILE, SUMMARY_FILE):
            return [path.parent]
        raise RunLoadError(f"{item} is a file; give a run directory, a folder holding runs, or a glob")
    dirs = find_run_dirs(path)
    if not dirs:
        raise RunLoadError(f"no run directory (a folder with {METRICS_FILE} and {CONFIG_FILE}) found in or below {item}")
    return dirs
