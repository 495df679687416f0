"""Cheaper XLA CPU compiles for the tests, which compile far more than they compute: the backend's
LLVM optimisation off, the older loop emitters instead of the fusion emitters, one LLVM module.

The test processes use FLAGS (conftest); so do subprocesses whose executables are only measured.
- LLVM optimisation off: on the 7B plan (data=1,fsdp=16,tensor=4, 60-s video) dpo and reference
  peak / temp / argument bytes and FLOPs identical to the default flags, compile CPU time halved.
- `--xla_cpu_use_fusion_emitters=false` + `--xla_cpu_parallel_codegen_split_count=1` on top (2026-12-07):
  the same plan's peak bytes within 448 of 11.4 GB, FLOPs within 0.003 %, compile 40 -> 26 CPU s;
  tests/training/test_context_parallel.py 134 -> 64 CPU s; the whole suite with an empty compile
  cache 15 min 23 s -> 10 min 18 s on 2 cores (1,672 -> 1,095 CPU s), every test passing. The split
  count (default 32) cuts compile wall time on a many-core host; on 2 cores its parts only add work.
  Users' runs keep XLA's defaults.
"""

from __future__ import annotations

import os

FLAGS = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true",
         "--xla_cpu_use_fusion_emitters=false", "--xla_cpu_parallel_codegen_split_count=1")


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a test process with `devices` fake CPU devices (VSALMONN_TEST_XLA_OPT=1: no FLAGS)."""
    fast = () if os.environ.get("VSALMONN_TEST_XLA_OPT") == "1" else FLAGS
    return " ".join([f"--xla_force_host_platform_device_count={devices}", *fast])


def env(drop=("XLA_FLAGS", "VSALMONN_PLAN_DEVICES")) -> dict[str, str]:
    """os.environ without `drop`, with XLA_FLAGS = FLAGS (a plan child adds its device count)."""
    out = {k: v for k, v in os.environ.items() if k not in drop}
    out["XLA_FLAGS"] = " ".join(FLAGS)
    return out
