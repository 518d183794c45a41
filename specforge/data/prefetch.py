"""Training batches prepared ahead of the training step, in worker processes.

A training batch is a pure function of (seed, step) (:mod:`specforge.data.pipeline`), so
workers can compute the batches of the next steps while the model trains on this one, and
the batches stay bit-identical whatever the number of workers or the order in which they
finish: the loop receives batch ``s`` for step ``s``, always.

The engine is the standard library's :class:`~concurrent.futures.ProcessPoolExecutor`. On
Linux its workers are forked, so an in-memory training set is shared with them
copy-on-write rather than copied; elsewhere they are spawned and receive a pickled copy.
At most ``workers * prefetch`` batches are in flight, so a streaming image folder holds
O(workers x prefetch x batch) images in memory, whatever its size. Workers ignore SIGINT:
Ctrl-C reaches the training process, which finishes its step and checkpoints, then stops
the workers.
"""

from __future__ import annotations

import concurrent.futures.process
import multiprocessing
import os
import signal
from typing import Any

import numpy as np

from specforge.data.pipeline import Batch
from specforge.data.sources import DataError

#: The batch source of this worker process, and the shared memory it writes images into
#: (set once, when the worker starts).
_worker_source: Any = None
_worker_slots: list[Any] = []


def default_workers(accelerated: bool) -> int:
    """`data.workers: auto`. Training on an accelerator (a GPU): one worker per core left
    over by the training process, at most 4 (numpy's batch work is memory-bound beyond
    that). On the CPU, none: training's own threads already use every core, and a worker
    competing with them costs more than it saves (bench/data_workers.py, 2 cores: 0.820 of
    the rate without augmentation with a worker, 0.873 without)."""
    if not accelerated:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        (os.cpu_count() or 1)
    return max(0, min(4, cores - 1))


def resolve_workers(setting: int | str, accelerated: bool) -> int:
    """The number of worker processes for the spec's `data.workers`, training on an
    accelerator or not."""
    return default_workers(accelerated) if setting == "auto" else int(setting)


def _start_worker(source: Any, slots: list[Any]) -> None:
    global _worker_source, _worker_slots
    _worker_source, _worker_slots = source, slots
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the training process's


def _train_batch(step: int, slot: int) -> tuple[Batch | None, tuple[int, ...], str, Any]:
    """Step ``step``'s batch: its images written into shared-memory slot ``slot`` when they
    fit there (no pickling of megabytes through a pipe), else the whole batch."""
    batch = _worker_source.train_batch(step)
    x = batch.x
    if slot < 0 or not isinstance(x, np.ndarray) or x.nbytes > _worker_slots[slot].size:
        return batch, (), "", None
    np.copyto(np.ndarray(x.shape, x.dtype, buffer=_worker_slots[slot].buf), x)
    return None, x.shape, x.dtype.str, batch.y


class PrefetchedBatches:
    """A batch source (``.train_batch(step)``) that computes ``source``'s batches of the
    steps after the one asked for in ``workers`` processes, up to ``workers * prefetch``
    ahead, and never past ``end`` (the run's last step + 1). The images come back through
    shared memory, one slot per batch in flight."""

    def __init__(self, source: Any, workers: int, prefetch: int, end: int) -> None:
        if workers < 1 or prefetch < 1:
            raise ValueError("PrefetchedBatches needs at least one worker and prefetch >= 1")
        self.source, self.workers = source, workers
        self.window, self.end = workers * prefetch, end
        self.pool: concurrent.futures.ProcessPoolExecutor | None = None
        self.slots: list[Any] = []
        self.free: list[int] = []
        self.pending: dict[int, tuple[concurrent.futures.Future[Any], int]] = {}

    def train_batch(self, step: int) -> Batch:
        if self.pool is None:  # the first batch, made here, sizes the slots
            batch = self.source.train_batch(step)
            self._start(batch)
            return batch
        if step not in self.pending:  # a jump (a resumed run's first step): start afresh
            self._cancel()
        for ahead in range(step, min(step + self.window, self.end)):
            if ahead not in self.pending:
                self._submit(ahead)
        if step not in self.pending:  # past `end`: asked for all the same
            self._submit(step)
        future, slot = self.pending.pop(step)
        try:
            batch, shape, dtype, labels = future.result()
        except concurrent.futures.process.BrokenProcessPool:
            raise DataError(f"a data worker process died while preparing step {step}'s batch "
                            "(out of memory?); set `data.workers: 0` to prepare batches in "
                            "the training process") from None
        finally:
            self._release(slot, future)
        if batch is not None:
            return batch
        # a copy: the slot takes another batch while the step may still read these images
        view = np.ndarray(shape, np.dtype(dtype), buffer=self.slots[slot].buf)
        return Batch(view.copy(), labels)

    def _start(self, first: Batch) -> None:
        """Shared memory for ``window`` batches like ``first`` (one image more: shards of a
        batch differ by one), then the workers, which inherit it when forked."""
        from multiprocessing import shared_memory

        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        x = first.x
        if method == "fork" and isinstance(x, np.ndarray) and len(x):
            size = x.nbytes // len(x) * (len(x) + 1)
            self.slots = [shared_memory.SharedMemory(create=True, size=size)
                          for _ in range(self.window)]
            self.free = list(range(self.window))
        self.pool = concurrent.futures.ProcessPoolExecutor(
            self.workers, multiprocessing.get_context(method), initializer=_start_worker,
            initargs=(self.source, self.slots))

    def _submit(self, step: int) -> None:
        slot = self.free.pop() if self.free else -1
        assert self.pool is not None
        self.pending[step] = (self.pool.submit(_train_batch, step, slot), slot)

    def _release(self, slot: int, future: concurrent.futures.Future[Any]) -> None:
        """Give ``slot`` back once ``future``'s worker can no longer write into it."""
        if slot < 0:
            return
        if future.done():
            self.free.append(slot)
        else:  # still running: a callback from the executor's thread (list.append is atomic)
            future.add_done_callback(lambda _: self.free.append(slot))

    def _cancel(self) -> None:
        for future, slot in self.pending.values():
            future.cancel()
            self._release(slot, future)
        self.pending.clear()

    def close(self) -> None:
        """Stop the workers now, dropping the batches still being prepared, and free the
        shared memory."""
        self._cancel()
        if self.pool is not None:
            processes = list(getattr(self.pool, "_processes", {}).values())
            self.pool.shutdown(wait=False, cancel_futures=True)
            for process in processes:  # a worker busy with a batch would finish it first
                process.terminate()
            for process in processes:
                process.join(timeout=5)
        for memory in self.slots:
            memory.close()
            memory.unlink()
        self.slots, self.free = [], []
