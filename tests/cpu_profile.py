"""Per-test CPU-time profile (`VSALMONN_TEST_PROFILE=path pytest ...`): one JSON line per test with its
wall seconds, the CPU seconds of the test process and of the subprocesses it waited for, and when it
ended (unix seconds: how the xdist workers' load was spread over the run).

CPU time, unlike wall time, hardly changes when other jobs load the machine, so hot tests can be found
on a shared machine; xdist workers append to the same file. The slowest are listed at the session end.
"""

from __future__ import annotations

import json
import os
import resource
import time

import pytest

ENV = "VSALMONN_TEST_PROFILE"


def _cpu() -> tuple[float, float]:
    """(this process's CPU seconds, its waited-for children's CPU seconds)."""
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time(), kids.ru_utime + kids.ru_stime


def read(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def top(rows: list[dict], n: int = 20) -> list[str]:
    """The `n` tests with the most CPU seconds (own + children), as report lines."""
    rows = sorted(rows, key=lambda r: -(r["cpu_s"] + r["children_cpu_s"]))[:n]
    return [f"{r['cpu_s'] + r['children_cpu_s']:8.1f} CPU s ({r['children_cpu_s']:6.1f} in children)"
            f" {r['wall_s']:8.1f} wall s  {r['test']}" for r in rows]


class Profile:
    def __init__(self, path: str):
        self.path = path

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item):
        own, kids = _cpu()
        wall = time.perf_counter()
        yield
        own2, kids2 = _cpu()
        row = {"test": item.nodeid, "wall_s": round(time.perf_counter() - wall, 3),
               "cpu_s": round(own2 - own, 3), "children_cpu_s": round(kids2 - kids, 3),
               "worker": os.environ.get("PYTEST_XDIST_WORKER", "main"), "end": round(time.time(), 1)}
        with open(self.path, "a") as f:   # one short append per line: safe across xdist workers
            f.write(json.dumps(row) + "\n")

    def pytest_terminal_summary(self, terminalreporter):
        # an xdist worker has `workerinput` (the env var also reaches a pytest the tests start)
        if hasattr(terminalreporter.config, "workerinput") or not os.path.exists(self.path):
            return
        terminalreporter.section(f"CPU time per test ({self.path})")
        for line in top(read(self.path)):
            terminalreporter.write_line(line)


def register(config) -> None:
    """Called from conftest's pytest_configure: profile when $VSALMONN_TEST_PROFILE names a file."""
    path = os.environ.get(ENV)
    if path:
        config.pluginmanager.register(Profile(os.path.abspath(path)), "vsalmonn_cpu_profile")
