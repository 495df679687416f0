"""Shared bench helpers: timing (best-of-n or median after warm-up), this CPU's measured fp32 matmul peak."""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


def _timings(fn: Callable[[], object], repeats: int, warmup: int,
             clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Seconds of each of `repeats` calls (after `warmup` untimed calls); blocks on jax."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = clock()
        jax.block_until_ready(fn())
        times.append(clock() - start)
    return times


def best_process_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """CPU seconds (all of this process's threads) of the cheapest of `repeats` calls: the work done,
    steadier than wall time on a loaded machine."""
    return min(_timings(fn, repeats, warmup, time.process_time))


def best_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Seconds of the fastest of `repeats` calls (after `warmup` untimed calls); blocks on jax."""
    return min(_timings(fn, repeats, warmup))


def median_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Seconds of the median of `repeats` calls (after `warmup` untimed calls); blocks on jax."""
    return float(np.median(_timings(fn, repeats, warmup)))


def matmul_peak_flops(n: int = 2048, repeats: int = 5) -> float:
    """fp32 FLOP/s of a jitted n x n x n matmul: the practical peak of this CPU for our kernels."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32))
    f = jax.jit(lambda x: x @ x)
    return 2 * n**3 / best_time(lambda: f(a), repeats)


def add_llm_shape_args(p, seq: int) -> None:
    """The small Qwen2 shape the LLM benchmarks share (4 layers, hidden 512, GQA 8/2)."""
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--inter", type=int, default=1376)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=seq)
    p.add_argument("--repeats", type=int, default=3)


def bench_line(name: str, value: float) -> str:
    line = f"BENCH {name} {value:.4g}"
    print(line, flush=True)
    return line

