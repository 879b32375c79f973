"""How many CPU threads torch uses: the same number every time on the same machine.

The thread count changes the numbers a run computes (reductions split over threads sum in another
order): 200 demo steps with 1 and with 2 threads differ from step 3 on. So the default never follows
the machine's load: it is torch's default, capped by this rank's share of the cores, and a busy machine
only gets a printed suggestion. Measured on the 2-core CI-class machine (demo model, median s/step over
80-200 steps): quiet, 1 thread 0.164 s and 2 threads 0.107 s; with two other training processes
running, 1 thread 0.164 s and 2 threads 0.477 s (a thread waiting for a busy core stalls every other
thread's step). ``threads=N`` in the config sets the count; the count used is recorded with the run.
"""

from __future__ import annotations

import math
import os

import torch


def choose_threads(
    requested: int | None,
    device: torch.device,
    *,
    default: int | None = None,
    cores: int | None = None,
    load: float | None = None,
    local_ranks: int | None = None,
) -> tuple[int, str | None]:
    """The thread count for this process, and a suggestion when the machine is busy.

    ``requested`` (the ``threads`` config value) wins. On CUDA torch's default stays. On CPU: torch's
    default, at most this rank's share of the cores (``LOCAL_WORLD_SIZE`` ranks per machine): never a
    function of the load, so the same command gives the same numbers. When the 1-minute load leaves
    fewer cores free, the note suggests ``threads=N`` (faster now, other numbers). ``default``,
    ``cores``, ``load`` and ``local_ranks`` are read from torch and the machine when not given.

    >>> choose_threads(None, torch.device("cpu"), default=2, cores=2, load=2.3)[0]  # busy: still 2
    2
    >>> choose_threads(None, torch.device("cpu"), default=2, cores=2, load=0.1)
    (2, None)
    >>> choose_threads(None, torch.device("cpu"), default=8, cores=8, local_ranks=4)[0]  # a rank's share
    2
    """
    default = torch.get_num_threads() if default is None else default
    if requested is not None:
        return requested, None
    if device.type != "cpu":
        return default, None
    cores = cores or os.cpu_count() or 1
    local_ranks = max(1, local_ranks or int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    threads = max(1, min(default, cores // local_ranks))
    if load is None:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    free = max(1, math.floor((cores - load) / local_ranks + 0.5))
    if free >= threads:
        return threads, None
    return threads, (
        f"note: the machine is busy (load {load:.1f} on {cores} cores{f' shared by {local_ranks} ranks' if local_ranks > 1 else ''}): "
        f"this run uses {threads} CPU thread(s) per process, as on a quiet machine, so that its numbers do not "
        f"depend on the load; threads={free} would run faster now (a busy core stalls every thread's step) but "
        "computes other numbers"
    )
