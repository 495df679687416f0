"""Dead / orphaned grain worker processes: the loader's waits notice a killed worker (grain 0.2.18 can
block forever on one) and workers exit when the trainer that started them is gone (even by kill -9).

`WatchedIterator` calls next() of the grain iterator on a helper thread; the caller waits in short
slices, checking the worker processes that appeared during its calls (and running signal handlers).
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import queue
import threading
import time

GRAIN_WORKER_PREFIX = "grain-process-prefetch"


class WorkerDied(RuntimeError):
    """A data worker process ended abnormally (killed, out of memory, crashed)."""


def watch_parent(poll_s: float = 1.0) -> None:
    """In a worker process: exit when the parent process is gone (its pid is no longer our parent's),
    so a trainer killed with -9 leaves no orphaned workers behind."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _grain_workers() -> dict[int, multiprocessing.Process]:
    return {p.pid: p for p in multiprocessing.active_children()
            if p.name.startswith(GRAIN_WORKER_PREFIX) and p.pid is not None}


class WatchedIterator:
    """`next(it)` with a check every `poll_s` seconds of waiting that no worker process started for
    this iterator has died: raises WorkerDied naming the pid and exit code instead of hanging."""

    def __init__(self, it, poll_s: float = 0.5):
        self.it, self.poll_s = it, poll_s
        self.workers: dict[int, multiprocessing.Process] = {}
        self.dead: WorkerDied | None = None
        self.pending = 0   # requests whose result was not taken (a wait cut short by a signal)
        self._requests: queue.Queue = queue.Queue()
        self._results: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._serve, name="data-next", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while self._requests.get() is not None:
            try:
                self._results.put((True, next(self.it)))
            except BaseException as err:  # noqa: BLE001 - handed to the caller's thread
                self._results.put((False, err))

    def __iter__(self):
        return self

    def __next__(self):
        if self.dead is not None:
            raise self.dead
        before = set(_grain_workers())
        if not self.pending:
            self._requests.put(True)
            self.pending = 1
        while True:
            try:
                ok, value = self._results.get(timeout=self.poll_s)
            except queue.Empty:
                self._check(before)
                continue
            self.pending = 0
            self._note(before)
            if ok:
                return value
            if isinstance(value, RuntimeError) and "Worker process was terminated" in str(value):
                self._check(before)   # grain noticed first: name the worker
                self.dead = WorkerDied(f"a data worker process died: {value}")
                raise self.dead from value
            raise value

    def _note(self, before: set[int]) -> None:
        """Remember the workers started during our calls (alive now), to check them later."""
        self.workers.update({pid: p for pid, p in _grain_workers().items() if pid not in before})

    def _check(self, before: set[int]) -> None:
        self._note(before)
        for pid, process in self.workers.items():
            code = process.exitcode
            if code is not None and code != 0:
                how = f" (killed by signal {-code})" if code < 0 else ""
                self.dead = WorkerDied(
                    f"data worker process {pid} ended with exit code {code}{how}; the data pipeline "
                    f"cannot go on (out of memory? see the system log / dmesg). Resume with the same "
                    f"command: training continues from the last checkpoint.")
                self.kill_workers()
                raise self.dead

    def kill_workers(self) -> None:
        """SIGKILL this iterator's remaining workers (after a death grain cannot stop them cleanly)
        and detach them from grain (see `_detach_from_grain`)."""
        for process in self.workers.values():
            if process.exitcode is None:
                process.kill()
                process.join(timeout=5)
        _detach_from_grain(set(self.workers))

    def close(self) -> bool:
        """Stop the helper thread. Returns whether grain may close its iterator itself: not after a
        death or a wait cut short (grain's close would block on the dead / busy worker), where the
        remaining workers are killed instead."""
        self._requests.put(None)
        if self.dead is not None or self.pending:
            self.kill_workers()
            return False
        return True


def _detach_from_grain(pids: set[int]) -> None:
    """Make grain forget these (killed) worker processes: its iterator's close - also run by a
    multiprocessing finalizer at interpreter exit - drains the worker's queue, which blocks forever
    on a message the killed worker left half-written. grain 0.2.18 internals: an iterator whose
    `_prefetch_process` is None has nothing to stop."""
    for obj in gc.get_objects():
        if type(obj).__name__ == "ProcessPrefetchDatasetIterator":
            process = getattr(obj, "_prefetch_process", None)
            if process is not None and process.pid in pids:
                obj._prefetch_process = None
