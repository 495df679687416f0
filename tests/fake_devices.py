"""The environment of a test process with N fake CPU devices: XLA_FLAGS (compile_only) and PJRT_NPROC,
the size of XLA:CPU's thread pools, large enough that the devices' collectives cannot deadlock it.

Why PJRT_NPROC: the CPU client sizes its pools max(cores, devices) (8 threads on 2 cores with 8 fake
devices), each device runs its independent thunks concurrently on them, and a collective holds its
thread until every device joins. A device that starts a loop with a collective inside (a layer scan's
gradient all-reduce) before an earlier independent all-reduce has got a thread leaves that all-reduce
queued behind 8 blocked threads: XLA aborts after 40 s ("Termination timeout for all reduce ...
only 1 of them arrived"). Seen in CI in tests/training/test_steps.py; here 4 aborts in about 70 runs
of one DPO step test with 8 threads, 0 in 66 with PJRT_NPROC=32. Users' runs are not affected: one
CPU device, or real accelerators.
"""

from __future__ import annotations

import os

import compile_only

THREADS_PER_DEVICE = 4


def env(devices: int, base: dict[str, str] | None = None) -> dict[str, str]:
    """`base` (default os.environ) with XLA_FLAGS for `devices` fake devices and, for more than one,
    PJRT_NPROC = 4 x devices (at least the cores); one device keeps XLA's default pools."""
    out = dict(os.environ if base is None else base, XLA_FLAGS=compile_only.xla_flags(devices))
    out.pop("PJRT_NPROC", None)
    if devices > 1:
        out["PJRT_NPROC"] = str(max(os.cpu_count() or 1, THREADS_PER_DEVICE * devices))
    return out
