"""How much slower this machine is now than the quiet 2-core machine the timeouts were sized on.

Subprocess and per-test timeouts are multiplied by `slowdown()`, so a busy shared machine (CI beside
other jobs) gets proportionally more time instead of failing; nothing asserts on wall-clock time.
"""

from __future__ import annotations

import functools
import os
import statistics
import time

# Median of `_probe()` on the quiet reference machine (2 cores, Python 3.11), seconds.
REFERENCE_PROBE_S = 0.024
MAX_SLOWDOWN = 12.0


def _probe() -> float:
    """A fixed single-threaded interpreter workload (~25 ms on the reference machine)."""
    start = time.perf_counter()
    total = 0
    for i in range(300_000):
        total += i * i % 7
    return time.perf_counter() - start


def slowdown() -> float:
    """>= 1: the larger of the measured probe ratio and the run queue per core (1-min load)."""
    probe = statistics.median(_probe() for _ in range(5)) / REFERENCE_PROBE_S
    load = os.getloadavg()[0] / (os.cpu_count() or 1)
    return min(MAX_SLOWDOWN, max(1.0, probe, load))


@functools.cache
def session_slowdown() -> float:
    """slowdown() measured once per test process (per-test timeouts are set from it)."""
    return slowdown()


def scaled(seconds: float) -> float:
    """A timeout of `seconds` on the quiet reference machine, stretched for the load right now."""
    return seconds * slowdown()
