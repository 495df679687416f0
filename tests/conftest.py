"""Test set-up: 8 fake CPU devices and cheap compiles (XLA_FLAGS, before any jax import), fp32 highest
matmul precision, seeds."""

import os
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import fake_devices  # noqa: E402

# The suite compiles far more than it computes: cheaper XLA CPU compiles (compile_only.FLAGS) took the
# suite from 1,672 to 1,095 CPU s with an empty compile cache, same results. VSALMONN_TEST_XLA_OPT=1:
# XLA's defaults. PJRT_NPROC: thread pools the 8 devices' collectives cannot deadlock (fake_devices).
for name, value in fake_devices.env(8, {}).items():
    os.environ.setdefault(name, value)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from vsalmonn_jax import compile_cache  # noqa: E402

# the suite writes only compiles over 0.5 s (users' runs: every one; compile_cache.py): at 0 the cold
# suite spent 1,339 CPU s against 1,308 (2026-12-07), thousands of tiny jits written for nothing
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
compile_cache.enable()   # the users' cache folder: compiled steps are shared across tests and runs

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

def pytest_configure(config):
    import cpu_profile

    cpu_profile.register(config)   # VSALMONN_TEST_PROFILE=path: CPU seconds per test
    if config.pluginmanager.hasplugin("xdist"):
        import xdist_crash_safe

        config.pluginmanager.register(xdist_crash_safe)   # a dead worker must not hang the run


# pytest-timeout's limit (pyproject `timeout`) is for a quiet machine: stretch it by the slowdown
# measured at collection (tests/machine.py), as the subprocess timeouts are, up to a cap that keeps a
# hung test from eating CI's whole budget. The `thread` method (pyproject) also stops a test stuck in
# native code: it ends the worker, which xdist reports and replaces (tests/xdist_crash_safe.py).
MAX_TEST_TIMEOUT_S = 2400


def pytest_collection_modifyitems(config, items):
    _slow_modules_first(items)
    from machine import session_slowdown

    base = float(config.getini("timeout") or 0)
    if not base:
        return
    limit = int(min(base * session_slowdown(), MAX_TEST_TIMEOUT_S))
    for item in items:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(limit))


def _slow_modules_first(items) -> None:
    """Modules holding a `slow` test run first (each module kept whole, so its fixtures are built once
    per worker): the long tests start while both xdist workers are free and the short ones fill the end,
    instead of one worker finishing a 4-minute test alone."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)   # stable: collection order otherwise


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _seed_torch():
    try:
        import torch
    except ImportError:
        yield
        return
    torch.manual_seed(0)
    torch.set_num_threads(1)
    yield
