"""SIGTERM / SIGINT during training: the first asks the loop to save a checkpoint and stop (also while it
waits on data); a second Ctrl-C aborts at once without saving."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator


class Interrupted(Exception):
    """Raised out of a data wait (`StopSignals.waiting`) when a stop signal arrives there."""


class StopSignals:
    """The stop request of SIGTERM / SIGINT: `is_set()`, the signal's `name`, and `waiting()` for
    blocking calls the signal must cut short (data waits: their partial work is simply redone)."""

    def __init__(self):
        self.event = threading.Event()
        self.name = ""
        self._waiting = False

    def is_set(self) -> bool:
        return self.event.is_set()

    def handle(self, signum, _frame) -> None:
        self.name = signal.Signals(signum).name
        self.event.set()
        if signum == signal.SIGINT:   # the next Ctrl-C aborts immediately (KeyboardInterrupt)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            print("\nSIGINT: saving a checkpoint and stopping (press Ctrl-C again to abort without "
                  "saving)", file=sys.stderr, flush=True)
        if self._waiting:
            raise Interrupted(self.name)

    @contextlib.contextmanager
    def waiting(self, enabled: bool = True) -> Iterator[None]:
        if not enabled:
            yield
            return
        if self.event.is_set():
            raise Interrupted(self.name)
        self._waiting = True
        try:
            yield
        finally:
            self._waiting = False


@contextlib.contextmanager
def stop_signals() -> Iterator[StopSignals]:
    """StopSignals wired to SIGTERM and SIGINT while inside (main thread only; elsewhere it is never
    set); the previous handlers come back on exit."""
    stop = StopSignals()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {s: signal.signal(s, stop.handle) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
