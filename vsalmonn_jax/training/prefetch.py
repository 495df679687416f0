"""Batches built ahead in a background thread, so that decoding a batch's media overlaps the step
before it; the data position reported is that of the last batch handed out, as a resume needs.

Used for the AV env's training and reference batches (mrDPO rounds, rebirth), whose iterators decode
video when a batch is built; grain's loader (SFT) has its own read-ahead.
"""

from __future__ import annotations

import queue
import threading

_POLL_S = 0.2   # how often a blocked producer / consumer looks at the stop flag


class Prefetch:
    """Iterate `iterator` with up to `depth` batches built ahead by a daemon thread.

    The thread starts at the first `next` (after any `set_state`). get_state() is the inner
    iterator's state after the last batch this object returned (batches built ahead and not yet
    handed out are not counted: a resume rebuilds them). An error of the inner iterator is raised by
    the `next` that would have returned its batch, after the batches before it. close() stops the
    thread; use `with Prefetch(...) as batches:` where the iterator may be left early.
    """

    def __init__(self, iterator, depth: int = 2):
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self.iterator, self.depth = iterator, int(depth)
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._state = self._inner_state()
        self._ended = False

    def _inner_state(self):
        return self.iterator.get_state() if hasattr(self.iterator, "get_state") else None

    def _produce(self, out: queue.Queue, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                item = ("batch", next(self.iterator), self._inner_state())
            except StopIteration:
                item = ("end", None, None)
            except BaseException as err:   # noqa: BLE001  handed to the consumer, in order
                item = ("error", err, None)
            while not stop.is_set():
                try:
                    out.put(item, timeout=_POLL_S)
                    break
                except queue.Full:
                    continue
            if item[0] != "batch":
                return

    def _start(self) -> None:
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.depth)
        self._thread = threading.Thread(target=self._produce, args=(self._queue, self._stop),
                                        name="vsalmonn-prefetch", daemon=True)
        self._thread.start()

    def __iter__(self):
        return self

    def __next__(self):
        if self._ended:
            raise StopIteration
        if self._thread is None:
            self._start()
        while True:   # short waits: a signal handler (stop_signals) can interrupt between them
            try:
                kind, value, state = self._queue.get(timeout=_POLL_S)
                break
            except queue.Empty:
                continue
        if kind == "batch":
            self._state = state
            return value
        self._ended = True
        self.close()
        if kind == "end":
            raise StopIteration
        raise value

    def get_state(self):
        return self._state

    def set_state(self, state) -> None:
        """Move the inner iterator to `state` (stops the thread; batches built ahead are dropped)."""
        self.close()
        self._ended = False
        self.iterator.set_state(state)
        self._state = self._inner_state()

    def close(self) -> None:
        """Stop the thread (waits for a batch it is building) and drop what it built ahead; the inner
        iterator goes back to the last batch handed out, so iterating on loses nothing."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread, self._queue = None, None
        if self._state is not None and not self._ended:
            self.iterator.set_state(self._state)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
