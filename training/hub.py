"""Checkpoints and runs on the Hugging Face Hub: ``hf://OWNER/REPO[/PATH][@REVISION]`` wherever a local
checkpoint or run is accepted (``init_from``, ``load_checkpoint``, ``analysis.evaluate``, the visualiser).

The repository (only ``PATH`` of it, when given) is fetched into the Hub's own cache by
``huggingface_hub`` (``HF_HOME`` / ``HF_HUB_CACHE``; ``HF_HUB_OFFLINE=1`` reads the cache only), and the
local folder or file then loads like any other: a ``model.safetensors`` export of this toolkit, a run's
``checkpoints/``, or a reference ``step_N`` with its ``all_config.yaml``. Nothing fetched is unpickled
beyond tensors and plain containers (``weights_only`` loading; ``safetensors`` holds no code at all).

Example:
    >>> parse_hub_path("hf://alice/trm-sudoku/run1/checkpoints@v1.0")
    HubPath(repo_id='alice/trm-sudoku', path='run1/checkpoints', revision='v1.0')
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TypeGuard

from training.errors import CheckpointError

HUB_PREFIX = "hf://"
SIDE_FILES = ("all_config.yaml", "config.json")
"""Read with a checkpoint file from its folder: a reference ``step_N``'s config, a safetensors export's config."""
_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class HubPath:
    """A place on the Hub: a model repository, a path inside it (``""``: the whole repository), a revision."""

    repo_id: str
    path: str
    revision: str | None


def is_hub_path(text: str | Path) -> TypeGuard[str]:
    return isinstance(text, str) and text.startswith(HUB_PREFIX)


def parse_hub_path(text: str) -> HubPath:
    """``hf://OWNER/REPO[/PATH][@REVISION]`` -> :class:`HubPath`; a malformed one is a :class:`CheckpointError`."""
    rest = text[len(HUB_PREFIX) :]
    rest, at, revision = rest.partition("@")
    parts = [part for part in rest.split("/") if part]
    repo_id = "/".join(parts[:2])
    if len(parts) < 2 or not _REPO.match(repo_id) or ".." in parts or (at and not revision):
        raise CheckpointError(f"{text}: not a Hub path; expected hf://OWNER/REPO[/PATH][@REVISION], e.g. hf://alice/trm-sudoku/run1@main")
    return HubPath(repo_id, "/".join(parts[2:]), revision or None)


def fetch(text: str) -> Path:
    """The local copy of ``hf://...`` (downloaded into the Hub cache, or found there when offline)."""
    where = parse_hub_path(text)
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(f"{text}: reading from the Hub needs huggingface_hub: pip install 'trm-jd[hub]'") from None
    patterns = None
    if where.path:  # the path (a file or a folder) and the configs a file beside it is read with
        parent = where.path.rpartition("/")[0]
        patterns = [where.path, f"{where.path}/*", f"{where.path}/**"] + [f"{parent}/{name}" if parent else name for name in SIDE_FILES]
    try:
        folder = Path(snapshot_download(where.repo_id, revision=where.revision, allow_patterns=patterns))
    except Exception as error:  # noqa: BLE001 - the Hub client raises many types (HTTP, offline, missing revision)
        reason = str(error).strip().splitlines()[0][:240] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"{text}: not available ({type(error).__name__}: {reason}); without network it must already be in the Hub cache "
            "(HF_HUB_CACHE, e.g. from `hf download OWNER/REPO` on a machine with network)"
        ) from None
    local = folder / where.path if where.path else folder
    if not local.exists():
        raise CheckpointError(f"{text}: the repository has no {where.path!r} (its files are in {folder})")
    return local
