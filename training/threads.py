"""How many CPU threads torch uses: all free cores on a quiet machine, fewer on a busy one.

Measured on the 2-core CI-class machine (demo model, median s/step over 80-200 steps): quiet, 1 thread
0.164 s and 2 threads (torch's default) 0.107 s; with two other training processes running, 1 thread
0.164 s and 2 threads 0.477 s. Threads that wait for a busy core stall every step of every other thread,
so on a busy machine fewer threads are faster. ``threads=N`` in the config overrides the choice.
"""

from __future__ import annotations

import math
import os

import torch


def choose_threads(requested: int | None, device: torch.device, *, default: int | None = None, cores: int | None = None,
                   load: float | None = None, local_ranks: int | None = None) -> tuple[int, str | None]:
    """The thread count for this process and a note when it is not torch's default.

    ``requested`` (the ``threads`` config value) wins. On CUDA torch's default stays. On CPU: torch's
    default, at most this rank's share of the cores (``LOCAL_WORLD_SIZE`` ranks per machine), and at
    most the cores the 1-minute load average leaves free (at least 1). ``default``, ``cores``, ``load``
    and ``local_ranks`` are read from torch and the machine when not given.

    >>> choose_threads(None, torch.device("cpu"), default=2, cores=2, load=2.3)[0]
    1
    >>> choose_threads(None, torch.device("cpu"), default=2, cores=2, load=0.1)
    (2, None)
    """
    default = torch.get_num_threads() if default is None else default
    if requested is not None:
        return requested, None
    if device.type != "cpu":
        return default, None
    cores = cores or os.cpu_count() or 1
    local_ranks = max(1, local_ranks or int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if load is None:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    free = math.floor((cores - load) / local_ranks + 0.5)
    threads = max(1, min(default, cores // local_ranks, free))
    if threads >= default:
        return default, None
    return threads, (f"note: {threads} CPU thread(s) per process, not {default}: load {load:.1f} on {cores} cores"
                     f"{f' shared by {local_ranks} ranks' if local_ranks > 1 else ''} (a busy core stalls every thread's "
                     "step); threads=N overrides")
