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
import time
from typing import Any

from specforge.data.pipeline import Batch
from specforge.data.sources import DataError

#: The batch source of this worker process (set once, when the worker starts).
_worker_source: Any = None


def default_workers() -> int:
    """`data.workers: auto`: one worker per core left over by the training process, at
    most 4 (numpy's batch work is memory-bound beyond that)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        (os.cpu_count() or 1)
    return max(0, min(4, cores - 1))


def resolve_workers(setting: int | str) -> int:
    """The number of worker processes for the spec's `data.workers`."""
    return default_workers() if setting == "auto" else int(setting)


def _start_worker(source: Any) -> None:
    global _worker_source
    _worker_source = source
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the training process's


def _train_batch(step: int) -> Batch:
    return _worker_source.train_batch(step)


class PrefetchedBatches:
    """A batch source (``.train_batch(step)``) that computes ``source``'s batches of the
    steps after the one asked for in ``workers`` processes, up to ``workers * prefetch``
    ahead, and never past ``end`` (the run's last step + 1). ``waited`` counts the seconds
    the caller spent waiting for a batch that was not ready."""

    def __init__(self, source: Any, workers: int, prefetch: int, end: int) -> None:
        if workers < 1 or prefetch < 1:
            raise ValueError("PrefetchedBatches needs at least one worker and prefetch >= 1")
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        self.pool = concurrent.futures.ProcessPoolExecutor(
            workers, multiprocessing.get_context(method), initializer=_start_worker,
            initargs=(source,))
        self.window, self.end = workers * prefetch, end
        self.pending: dict[int, concurrent.futures.Future[Batch]] = {}
        self.waited = 0.0

    def train_batch(self, step: int) -> Batch:
        if step not in self.pending:  # a jump (a resumed run's first step): start afresh
            self._cancel()
        for ahead in range(step, min(step + self.window, self.end)):
            if ahead not in self.pending:
                self.pending[ahead] = self.pool.submit(_train_batch, ahead)
        future = self.pending.pop(step) if step in self.pending else \
            self.pool.submit(_train_batch, step)  # past `end`: asked for all the same
        started = time.perf_counter()
        try:
            batch = future.result()
        except concurrent.futures.process.BrokenProcessPool:
            raise DataError(f"a data worker process died while preparing step {step}'s batch "
                            "(out of memory?); set `data.workers: 0` to prepare batches in "
                            "the training process") from None
        self.waited += time.perf_counter() - started
        return batch

    def _cancel(self) -> None:
        for future in self.pending.values():
            future.cancel()
        self.pending.clear()

    def close(self) -> None:
        """Stop the workers now, dropping the batches still being prepared."""
        self._cancel()
        processes = list(getattr(self.pool, "_processes", {}).values())
        self.pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:  # a worker busy with a batch would finish it first
            process.terminate()
        for process in processes:
            process.join(timeout=5)
