"""Cheaper XLA CPU compiles for the tests, which compile far more than they compute: the backend's
LLVM optimisation is switched off (the HLO passes, results, buffer sizes and cost analysis are unchanged).

The test processes use FLAGS (conftest); so do subprocesses whose executables are only measured.
Measured on the 7B plan (data=1,fsdp=16,tensor=4, 60-s video): dpo and reference peak / temp / argument
bytes and FLOPs identical to the default flags, compile CPU time roughly halved. Cold cache, CPU s:
tests/training/test_steps.py 103 -> 63, tests/launch/test_multiprocess.py 71.5 -> 49.5.
"""

from __future__ import annotations

import os

FLAGS = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a test process with `devices` fake CPU devices (VSALMONN_TEST_XLA_OPT=1: no FLAGS)."""
    fast = () if os.environ.get("VSALMONN_TEST_XLA_OPT") == "1" else FLAGS
    return " ".join([f"--xla_force_host_platform_device_count={devices}", *fast])


def env(drop=("XLA_FLAGS", "VSALMONN_PLAN_DEVICES")) -> dict[str, str]:
    """os.environ without `drop`, with XLA_FLAGS = FLAGS (a plan child adds its device count)."""
    out = {k: v for k, v in os.environ.items() if k not in drop}
    out["XLA_FLAGS"] = " ".join(FLAGS)
    return out
