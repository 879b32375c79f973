"""Process-group set-up for single-process and ``torchrun`` runs (NCCL on GPU, gloo on CPU)."""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from training.config import ConfigError
from training.interrupt import StopSignals

T = TypeVar("T")


@dataclass(frozen=True)
class ElasticInfo:
    """What ``torchrun`` (torchelastic) tells a worker about restarts; all defaults outside torchrun.

    ``restart_count`` is 0 on the first attempt and counts the restarts after a worker failed;
    ``run_id`` is the rendezvous id, the same for every attempt of one ``torchrun`` job
    (a fresh UUID per job with ``--standalone`` or a single node; ``"none"`` unless ``--rdzv-id``
    is given on several nodes).
    """

    restart_count: int = 0
    max_restarts: int = 0
    run_id: str | None = None

    @property
    def is_restart(self) -> bool:
        return self.restart_count > 0

    @property
    def may_restart(self) -> bool:
        return self.max_restarts > 0

    @property
    def stable_id(self) -> str | None:
        """The run id as a file-name-safe string, or ``None`` when torchrun gave no usable one."""
        if not self.run_id or self.run_id == "none":
            return None
        return re.sub(r"[^A-Za-z0-9_.-]", "_", self.run_id)[:64]


def elastic_info(environ: dict[str, str] | None = None) -> ElasticInfo:
    """Read ``TORCHELASTIC_RESTART_COUNT``, ``TORCHELASTIC_MAX_RESTARTS`` and ``TORCHELASTIC_RUN_ID``."""
    env = os.environ if environ is None else environ
    try:
        restart_count = int(env.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
        max_restarts = int(env.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0)
    except ValueError as error:
        raise ConfigError(f"TORCHELASTIC_RESTART_COUNT / TORCHELASTIC_MAX_RESTARTS must be integers ({error})") from None
    return ElasticInfo(restart_count=restart_count, max_restarts=max_restarts, run_id=env.get("TORCHELASTIC_RUN_ID"))


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_choice: str) -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment, or run alone.

    ``device_choice`` is ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
    """
    if device_choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda was asked for but CUDA is not available; use device=auto or device=cpu")
    use_cuda = device_choice == "cuda" or (device_choice == "auto" and torch.cuda.is_available())
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend, device_id = ("nccl", device) if use_cuda else ("gloo", None)
        store = attempt_store(world_size)
        if store is None:
            dist.init_process_group(backend=backend, device_id=device_id)
        else:
            dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size, device_id=device_id)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def attempt_store(world_size: int) -> dist.Store | None:
    """Under ``torchrun``, the agent's key-value store with this restart attempt's own prefix (``None`` elsewhere).

    The agent keeps one store for the whole job; a worker group restarted after a crash would otherwise read
    the keys the failed group left there (its ranks' gloo addresses) and wait on dead peers until the
    connection times out. The prefix keeps every attempt's keys apart."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    from torch.distributed.constants import default_pg_timeout

    client = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False, timeout=default_pg_timeout)
    return dist.PrefixStore(f"trm-jd/attempt_{attempt}", client)


def teardown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def decide_on_main(dist_info: DistInfo, decide: Callable[[], T]) -> T:
    """Run ``decide`` on rank 0 only and give every rank its result, or raise its exception on every
    rank (so a bad input seen by rank 0 stops all ranks with the same error instead of a hang)."""
    if dist_info.world_size == 1:
        return decide()
    outcome: list[object] = [None, None]
    if dist_info.is_main:
        try:
            outcome[0] = decide()
        except Exception as error:  # noqa: BLE001 - re-raised below, on every rank
            outcome[1] = error if _picklable(error) else RuntimeError(f"{type(error).__name__}: {error}")
    dist.broadcast_object_list(outcome, src=0)
    if outcome[1] is not None:
        raise outcome[1]  # type: ignore[misc]  # an exception by construction (set in the except above)
    return outcome[0]  # type: ignore[return-value]  # what decide() returned on rank 0


def _picklable(value: object) -> bool:
    try:
        pickle.dumps(value)
    except Exception:  # noqa: BLE001 - any pickling failure means "send a plain copy instead"
        return False
    return True


def broadcast_module_(module: torch.nn.Module, world_size: int) -> None:
    """Make every rank start from rank 0's parameters and buffers."""
    if world_size == 1:
        return
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor, src=0)


def stop_requested(signals: StopSignals, world_size: int, device: torch.device) -> str | None:
    """The signal any rank received (SIGTERM/SIGINT), agreed by all ranks with one small all-reduce per step."""
    received = signals.received
    if world_size > 1:
        flag = torch.tensor([1.0 if received else 0.0], device=device)
        dist.all_reduce(flag)
        if flag.item() > 0 and received is None:
            received = "a signal on another rank"
    return received
