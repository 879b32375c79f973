"""The training batch stream, optionally overlapped with compute.

:class:`TrainBatches` hands the trainer its next global batch (this rank's slice) and keeps the data
position (``Progress.iteration``, ``Progress.batch_in_iteration``) at the batch *consumed*, so a
checkpoint resumes at the same batch whether or not batches were read ahead.

With ``depth > 0`` a background thread builds up to ``depth`` batches ahead of the step that runs; on
CUDA it also pins them and copies them to the GPU on a side stream, so the step finds its batch on
the device. The thread never crosses a data iteration: the end of an iteration (where hard-example
sampling re-weights the puzzles for the next one) runs on the trainer's thread, in the same order as
without read-ahead, so the batches and their order are the same either way. ``wait_s`` accumulates the
time the trainer waited for batches (logged as ``train/data_wait_s``).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from training.state import Progress

Batch = dict[str, Tensor]
_END = object()


class _Synchronous:
    """Batches built when asked, left on the host (the step copies them)."""

    def __init__(self, batches: Iterator[Batch]) -> None:
        self._batches = batches

    def get(self) -> Batch | None:
        return next(self._batches, None)

    def close(self) -> None:
        pass


class _ReadAhead:
    """A daemon thread building up to ``depth`` batches ahead (pinned and copied on a side stream on CUDA)."""

    def __init__(self, batches: Iterator[Batch], depth: int, device: torch.device) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._cuda = device.type == "cuda"
        self._device = device
        self._stream = torch.cuda.Stream(device) if self._cuda else None
        self._thread = threading.Thread(target=self._produce, args=(batches,), name="batch-read-ahead", daemon=True)
        self._thread.start()

    def _to_device(self, batch: Batch) -> tuple[Batch, object]:
        if not self._cuda:
            return batch, None
        with torch.cuda.stream(self._stream):
            moved = {key: value.pin_memory().to(self._device, non_blocking=True) for key, value in batch.items()}
            event = torch.cuda.Event()
            event.record(self._stream)
        return moved, event

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, batches: Iterator[Batch]) -> None:
        try:
            for batch in batches:
                if not self._put(self._to_device(batch)):
                    return
            self._put(_END)
        except BaseException as error:  # handed to the trainer's thread, raised there
            self._put(error)

    def get(self) -> Batch | None:
        item = self._queue.get()
        if item is _END:
            return None
        if isinstance(item, BaseException):
            raise item
        batch, event = item
        if event is not None:
            current = torch.cuda.current_stream(self._device)
            current.wait_event(event)
            for value in batch.values():
                value.record_stream(current)  # its memory is not reused while the step still reads it
        return batch

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get_nowait()
            except queue.Empty:
                self._thread.join(timeout=0.1)


class TrainBatches:
    """Global training batches across data iterations, read ahead ``depth`` batches (0: built when asked).

    ``open_iteration(i, start)`` gives iteration ``i``'s batches from ``start``; ``end_iteration()``
    runs after an iteration's last batch was consumed, before the next one is opened.
    """

    def __init__(
        self,
        progress: Progress,
        total_iterations: int,
        open_iteration: Callable[[int, int], Iterator[Batch]],
        end_iteration: Callable[[], None],
        depth: int,
        device: torch.device,
    ) -> None:
        if depth < 0:
            raise ValueError(f"the read-ahead depth must be >= 0, got {depth}")
        self._progress = progress
        self._total_iterations = total_iterations
        self._open_iteration = open_iteration
        self._end_iteration = end_iteration
        self._depth = depth
        self._device = device
        self._source: _Synchronous | _ReadAhead | None = None
        self.wait_s = 0.0

    def _open(self) -> _Synchronous | _ReadAhead:
        batches = self._open_iteration(self._progress.iteration, self._progress.batch_in_iteration)
        return _ReadAhead(batches, self._depth, self._device) if self._depth > 0 else _Synchronous(batches)

    def next(self) -> Batch | None:
        """The next batch (advancing the data position), or None when every iteration is done."""
        started = time.perf_counter()
        try:
            while self._progress.iteration < self._total_iterations:
                if self._source is None:
                    self._source = self._open()
                batch = self._source.get()
                if batch is not None:
                    self._progress.batch_in_iteration += 1
                    return batch
                self._source.close()
                self._source = None
                self._progress.iteration += 1
                self._progress.batch_in_iteration = 0
                self._end_iteration()
            return None
        finally:
            self.wait_s += time.perf_counter() - started

    def take_wait(self) -> float:
        """The waiting time since the last call (seconds)."""
        wait, self.wait_s = self.wait_s, 0.0
        return wait

    def close(self) -> None:
        """Stop reading ahead (the batches read ahead are dropped; the position is that of the last consumed)."""
        if self._source is not None:
            self._source.close()
            self._source = None
