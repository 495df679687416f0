"""The compile cache's effect on `vsalmonn-jax demo --quick`: two runs in one fresh workdir and one fresh
XLA cache folder; the second finds the data folder and the compiled executables of the first.

Timed as the CPU time (user + sys) of each child process, not wall time: the machine is shared and
loaded, and CPU time is what a second run saves. Wall seconds are printed too.
Ends with `BENCH demo_quick_second_vs_first <first / second CPU seconds>` (bar: >= 2).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

from common import bench_line


def child_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_demo(workdir: pathlib.Path, name: str, env: dict, extra: list[str]) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one `demo --quick` run into workdir/name."""
    cmd = [sys.executable, "-m", "vsalmonn_jax.cli", "demo", "--quick", "--out", str(workdir / name),
           f"--config.workdir={workdir}", *extra]
    cpu, wall = child_cpu_seconds(), time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    cpu, wall = child_cpu_seconds() - cpu, time.perf_counter() - wall
    if done.returncode:
        sys.exit(f"{name} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    print(f"{name}: {cpu:.1f} CPU s, {wall:.1f} wall s", flush=True)
    return cpu, wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--keep", default="", help="work in this folder (kept) instead of a temporary one")
    p.add_argument("overrides", nargs="*", help="extra demo flags, e.g. --config.demo.sft_steps=3")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = pathlib.Path(args.keep or tmp)
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}   # one CPU device
        env["VSALMONN_JAX_CACHE_DIR"] = str(workdir / "xla")   # fresh: the first run is cold
        first, _ = run_demo(workdir, "first", env, args.overrides)
        second, _ = run_demo(workdir, "second", env, args.overrides)
        entries = sum(1 for _ in (workdir / "xla").glob("*"))
        print(f"{entries} cache entries", flush=True)
        bench_line("demo_quick_second_vs_first", first / second)


if __name__ == "__main__":
    main()
