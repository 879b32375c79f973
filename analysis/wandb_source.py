"""Read runs from Weights & Biases, and optionally publish a W&B report of a comparison.

Every entry point checks, before touching the network, that W&B can be used: not in offline or
disabled mode, credentials present (``WANDB_API_KEY``, an identity-token file, or a ``.netrc`` entry
written by ``wandb login``), and the server reachable within a few seconds. It never prompts for a
login; when something is missing it raises ``WandbUnavailableError`` saying what and what to do.

Sources are written ``wandb:ENTITY/PROJECT`` (every run), ``wandb:ENTITY/PROJECT/RUN_ID`` (one run) or
``wandb:ENTITY/PROJECT@GROUP`` (one group: the trainer's ``project_name``, so one sweep).
"""

from __future__ import annotations

import os
import re
import socket
import sys
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from tqdm import tqdm

from analysis.runs import UNKNOWN, WANDB_PREFIX, MetricTable, Run
from training.wandb_credentials import DEFAULT_BASE_URL, find_wandb_credentials

OFFLINE_MODES = ("offline", "dryrun", "disabled")
_NAME = r"[A-Za-z0-9_.\-]+"
_SOURCE_PATTERN = re.compile(rf"^({_NAME})/({_NAME})(?:/({_NAME})|@(.+))?$")
_HOW_TO_ENABLE = (
    "To read W&B, run `wandb login` (or set WANDB_API_KEY) on a machine with network access; "
    "without W&B, point the command at local run directories (runs/<project_name>/...) instead"
)


class WandbUnavailableError(RuntimeError):
    """W&B cannot be used here (offline, no credentials, unreachable, package missing)."""


@dataclass(frozen=True)
class WandbSource:
    """A selection of W&B runs: a whole project, one run, or one group of a project."""

    entity: str
    project: str
    run_id: str | None = None
    group: str | None = None

    @property
    def path(self) -> str:
        return f"{self.entity}/{self.project}"


def parse_wandb_source(text: str) -> WandbSource:
    """Parse ``[wandb:]ENTITY/PROJECT``, ``.../RUN_ID`` or ``...@GROUP``; ValueError names the accepted forms."""
    body = text[len(WANDB_PREFIX) :] if text.startswith(WANDB_PREFIX) else text
    match = _SOURCE_PATTERN.match(body)
    if match is None:
        raise ValueError(f"not a W&B source: {text!r}; accepted: wandb:ENTITY/PROJECT, wandb:ENTITY/PROJECT/RUN_ID, wandb:ENTITY/PROJECT@GROUP")
    entity, project, run_id, group = match.groups()
    return WandbSource(entity=entity, project=project, run_id=run_id, group=group)


def wandb_unavailable_reason(environ: Mapping[str, str] | None = None) -> str | None:
    """Why W&B cannot be queried from here without the network (mode, credentials), or None."""
    environ = os.environ if environ is None else environ
    mode = environ.get("WANDB_MODE", "").strip().lower()
    if mode in OFFLINE_MODES:
        return (
            f"W&B is in {mode} mode (WANDB_MODE={environ['WANDB_MODE']}); unset WANDB_MODE or set "
            f"WANDB_MODE=online. Offline runs can be uploaded with `wandb sync RUN_DIR/wandb/offline-run-*`"
        )
    if environ.get("WANDB_DISABLED", "").strip().lower() in ("true", "1", "yes"):
        return "W&B is disabled (WANDB_DISABLED is set); unset it"
    if find_wandb_credentials(environ) is None:
        host = environ.get("WANDB_BASE_URL", DEFAULT_BASE_URL)
        return f"not logged in to W&B: no WANDB_API_KEY and no .netrc entry for {host}"
    return None


def _lookup(host: str, port: int, timeout_s: float) -> list[tuple[Any, ...]]:
    """``socket.getaddrinfo`` bounded by ``timeout_s`` (a name lookup has no timeout of its own)."""
    result: dict[str, Any] = {}

    def resolve() -> None:
        try:
            result["addresses"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as error:
            result["error"] = error

    worker = threading.Thread(target=resolve, daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise OSError(f"looking up {host} took longer than {timeout_s:g} s")
    if "error" in result:
        raise result["error"]
    if not result["addresses"]:
        raise OSError(f"{host} has no address")
    return result["addresses"]


def check_reachable(base_url: str, timeout_s: float = 3.0) -> None:
    """Raise ``WandbUnavailableError`` unless a TCP connection to ``base_url`` opens within ``timeout_s``."""
    parsed = urlparse(base_url)
    if not parsed.hostname:
        raise WandbUnavailableError(f"WANDB_BASE_URL={base_url!r} is not a URL (expected e.g. {DEFAULT_BASE_URL})")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        family, kind, protocol, _, address = _lookup(parsed.hostname, port, timeout_s)[0]
        with socket.socket(family, kind, protocol) as connection:
            connection.settimeout(timeout_s)
            connection.connect(address)
    except OSError as error:
        raise WandbUnavailableError(f"cannot reach W&B at {base_url} within {timeout_s:g} s ({error}). {_HOW_TO_ENABLE}.") from error


def ensure_wandb_available(environ: Mapping[str, str] | None = None, timeout_s: float = 3.0) -> None:
    """Fail fast, with a message saying what to do, unless W&B can be queried now."""
    environ = os.environ if environ is None else environ
    reason = wandb_unavailable_reason(environ)
    if reason is not None:
        raise WandbUnavailableError(f"{reason}. {_HOW_TO_ENABLE}.")
    check_reachable(environ.get("WANDB_BASE_URL", DEFAULT_BASE_URL), timeout_s=timeout_s)


def run_from_history(
    name: str,
    source: str,
    config: Mapping[str, Any],
    rows: Iterable[Mapping[str, Any]],
    summary: Mapping[str, Any] | None = None,
    group: str | None = None,
) -> Run:
    """A ``Run`` from W&B history rows (dicts with ``_step``); W&B's own ``_``-keys are dropped.

    ``group`` is the run's W&B group, which the trainer sets to the project name.
    """
    records = []
    for row in rows:
        if "_step" not in row:
            continue
        record = {k: v for k, v in row.items() if not k.startswith("_")}
        record["step"] = int(row["_step"])
        records.append(record)
    return Run(
        name=name,
        source=source,
        config=dict(config),
        metrics=MetricTable.from_records(records),
        summary=dict(summary or {}),
        default_project=group or UNKNOWN,
    )


def load_wandb_runs(source: str | WandbSource, progress: bool = True, timeout_s: int = 20) -> list[Run]:
    """Download the runs ``source`` selects (their config and full metric history)."""
    selection = source if isinstance(source, WandbSource) else parse_wandb_source(source)
    ensure_wandb_available()
    import wandb  # after the checks: importing it is slow and it must not prompt

    api = wandb.Api(timeout=timeout_s)
    try:
        if selection.run_id is not None:
            remote_runs = [api.run(f"{selection.path}/{selection.run_id}")]
        else:
            filters = {"group": selection.group} if selection.group is not None else None
            remote_runs = list(api.runs(selection.path, filters=filters))
    except Exception as error:  # wandb raises CommError, ValueError or requests errors here
        raise WandbUnavailableError(f"W&B query for {selection.path} failed: {error}") from error
    if not remote_runs:
        where = f" in group {selection.group!r}" if selection.group else ""
        raise WandbUnavailableError(f"W&B project {selection.path} has no runs{where}")
    runs = []
    for remote in tqdm(remote_runs, desc=f"downloading {selection.path}", unit="run", disable=not progress, file=sys.stderr):
        try:
            runs.append(
                run_from_history(
                    name=remote.name,
                    source=f"{WANDB_PREFIX}{selection.path}/{remote.id}",
                    config=dict(remote.config),
                    rows=remote.scan_history(),
                    summary={"status": remote.state},
                    group=remote.group,
                )
            )
        except Exception as error:  # the history is paged over the network
            raise WandbUnavailableError(f"downloading the history of W&B run {selection.path}/{remote.id} failed: {error}") from error
    return runs


def create_wandb_report(entity_project: str, runs: Sequence[Run], metrics: Sequence[str], title: str, description: str = "") -> str:
    """Publish a W&B report plotting ``metrics`` for the runs' groups (their ``project_name``); return its URL.

    Needs W&B online and the ``wandb-workspaces`` package; raises ``WandbUnavailableError`` otherwise.
    """
    source = parse_wandb_source(entity_project)
    if source.run_id is not None or source.group is not None:
        raise ValueError(f"a W&B report needs ENTITY/PROJECT, got {entity_project!r}")
    ensure_wandb_available()
    try:
        import wandb_workspaces.reports.v2 as wr
    except ImportError as error:
        raise WandbUnavailableError("creating a W&B report needs the wandb-workspaces package: pip install wandb-workspaces") from error
    groups = sorted({run.project for run in runs} - {UNKNOWN})
    filters = "group in [" + ", ".join(repr(g) for g in groups) + "]" if groups else ""
    try:
        runset = wr.Runset(
            entity=source.entity,
            project=source.project,
            name="runs compared",
            filters=filters,
            groupby=["config.jd.split", "config.jd.aggregator", "config.jd.scalarizer"],
        )
        panels = [wr.LinePlot(title=metric, x="Step", y=[metric]) for metric in metrics]
        report = wr.Report(
            entity=source.entity,
            project=source.project,
            title=title,
            description=description,
            blocks=[
                wr.H1(title),
                wr.P(description or "Runs grouped by jd.split, jd.aggregator and jd.scalarizer."),
                wr.PanelGrid(runsets=[runset], panels=panels),
            ],
        )
        report.save()
    except Exception as error:  # wandb-workspaces validation, network or permission failures
        raise WandbUnavailableError(f"creating the W&B report in {source.path} failed: {error}") from error
    return str(report.url)
