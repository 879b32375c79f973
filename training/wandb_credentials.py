"""Whether W&B credentials are present (environment or ``.netrc``), read without the network or the ``wandb`` package."""

from __future__ import annotations

import netrc
import os
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

DEFAULT_BASE_URL = "https://api.wandb.ai"


def find_wandb_credentials(environ: Mapping[str, str] | None = None) -> str | None:
    """Where W&B credentials were found (a short description), or None; reads no network, never prompts."""
    environ = os.environ if environ is None else environ
    if environ.get("WANDB_API_KEY"):
        return "WANDB_API_KEY"
    if environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return "WANDB_IDENTITY_TOKEN_FILE"
    netrc_path = Path(environ["NETRC"]) if environ.get("NETRC") else Path(environ.get("HOME", str(Path.home()))) / ".netrc"
    host = urlparse(environ.get("WANDB_BASE_URL", DEFAULT_BASE_URL)).hostname or ""
    if netrc_path.is_file():
        try:
            entry = netrc.netrc(str(netrc_path)).authenticators(host)
        except (netrc.NetrcParseError, OSError):
            entry = None
        if entry is not None and entry[2]:
            return str(netrc_path)
    return None
