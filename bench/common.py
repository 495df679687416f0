"""Shared bench helpers: timing (best-of-n after warm-up), this CPU's measured fp32 matmul peak."""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


def best_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Seconds of the fastest of `repeats` calls (after `warmup` untimed calls); blocks on jax."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_peak_flops(n: int = 2048, repeats: int = 5) -> float:
    """fp32 FLOP/s of a jitted n x n x n matmul: the practical peak of this CPU for our kernels."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32))
    f = jax.jit(lambda x: x @ x)
    return 2 * n**3 / best_time(lambda: f(a), repeats)


def bench_line(name: str, value: float) -> str:
    line = f"BENCH {name} {value:.4g}"
    print(line, flush=True)
    return line
