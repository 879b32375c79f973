"""What changes a run's numbers besides its config, recorded with the run.

The same config and seed give bit-identical metrics only with the same thread count, device, forward
dtype, compilation, world size and library versions. :func:`run_numerics` collects them; the trainer
writes them under ``numerics`` in ``config.yaml``, ``summary.json`` and the W&B config, and
``analysis.compare`` warns when the runs it compares differ in them (:func:`numerics_differences`).

Example:
    >>> numerics_differences([{"threads": 1, "torch": "2.13.0"}, {"threads": 2, "torch": "2.13.0"}, None])
    ['threads: 1, 2']
"""

from __future__ import annotations

import platform
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

IGNORED_IN_COMPARISONS = ("device_name",)
"""Recorded for the reader; another CPU model alone does not make a comparison suspect."""


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_numerics(device: torch.device, forward_dtype: torch.dtype, compiled: bool | str, world_size: int) -> dict[str, Any]:
    """Everything besides the config that changes this process's numbers (read when the run starts)."""
    return {
        "threads": torch.get_num_threads(),
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "forward_dtype": str(forward_dtype).removeprefix("torch."),
        "compile": compiled,
        "world_size": world_size,
        "torch": str(torch.__version__),
        "torchjd": _version("torchjd"),
        "numpy": _version("numpy"),
        "python": platform.python_version(),
    }


def numerics_differences(records: Sequence[dict[str, Any] | None]) -> list[str]:
    """``"KEY: v1, v2"`` for every recorded value that differs between runs (runs without a record are skipped)."""
    present = [record for record in records if isinstance(record, dict)]
    keys = sorted({key for record in present for key in record} - set(IGNORED_IN_COMPARISONS))
    differences = []
    for key in keys:
        values = sorted({str(record.get(key)) for record in present})
        if len(values) > 1:
            differences.append(f"{key}: {', '.join(values)}")
    return differences
