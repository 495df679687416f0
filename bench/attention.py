"""Attention kernels: gradient temp memory scaling (AOT compile only) and CPU speed vs a plain reference.

Run: .venv/bin/python bench/attention.py [--impl xla --block 512 --seq 4096 --heads 2 --kv-heads 1]
`attn_grad_temp_ratio_16k_4k`: temp bytes of the jitted gradient (q, k, v) of one 7B-width attention
layer (28 q / 4 kv heads, head 128, bf16, batch 1, causal + padding mask) at T=16,384 over T=4,096, from
`compiled.memory_analysis()` (nothing is allocated; linear is 4). `attn_fwd_bwd_vs_reference`: median
wall time of forward + backward of the kernel over that of the plain jnp reference at --seq, fp32.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from common import bench_line, median_time  # noqa: E402

from vsalmonn_jax.models.attention import MaskSpec, attention, reference_attention  # noqa: E402


def loss_fn(impl: str, block: int):
    """Sum of the attention output under a causal + padding mask, as a function of (q, k, v)."""
    def loss(q, k, v, key_mask):
        spec = MaskSpec(causal=True, key_mask=key_mask)
        if impl == "reference":
            out = reference_attention(q, k, v, spec)
        else:
            out = attention(q, k, v, spec, impl=impl, block=block)
        return jnp.sum(out.astype(jnp.float32))
    return loss


def grad_temp_bytes(impl: str, block: int, length: int, heads=28, kv_heads=4, dim=128,
                    dtype=jnp.bfloat16) -> int:
    """Temp bytes of the compiled gradient w.r.t. q, k, v at [1, length] (AOT: shapes only)."""
    q = jax.ShapeDtypeStruct((1, length, heads, dim), dtype)
    kv = jax.ShapeDtypeStruct((1, length, kv_heads, dim), dtype)
    mask = jax.ShapeDtypeStruct((1, length), jnp.bool_)
    grad = jax.jit(jax.grad(loss_fn(impl, block), argnums=(0, 1, 2)))
    return grad.lower(q, kv, kv, mask).compile().memory_analysis().temp_size_in_bytes


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--impl", default="xla")
    p.add_argument("--block", type=int, default=512)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--kv-heads", type=int, default=1)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    temps = {n: grad_temp_bytes(args.impl, args.block, n) for n in (4096, 16384)}
    ref_temps = {n: grad_temp_bytes("reference", args.block, n) for n in (4096, 16384)}
    for n in temps:
        print(f"grad temp at T={n:6d}: {args.impl} {temps[n] / 2**30:8.3f} GiB, "
              f"reference {ref_temps[n] / 2**30:8.3f} GiB")

    rng = np.random.default_rng(0)
    shape_q = (1, args.seq, args.heads, args.dim)
    shape_kv = (1, args.seq, args.kv_heads, args.dim)
    q, k, v = (jnp.asarray(rng.standard_normal(s, np.float32)) for s in (shape_q, shape_kv, shape_kv))
    key_mask = jnp.ones((1, args.seq), bool)
    times = {}
    for impl in (args.impl, "reference"):
        step = jax.jit(jax.value_and_grad(loss_fn(impl, args.block), argnums=(0, 1, 2)))
        times[impl] = median_time(lambda step=step: step(q, k, v, key_mask), args.repeats)
        print(f"forward+backward at T={args.seq}, heads {args.heads}/{args.kv_heads}, head {args.dim}, "
              f"fp32: {impl} {times[impl] * 1e3:8.1f} ms")
    bench_line("attn_grad_temp_ratio_16k_4k", temps[16384] / temps[4096])
    bench_line("attn_fwd_bwd_vs_reference", times[args.impl] / times["reference"])


if __name__ == "__main__":
    main()
