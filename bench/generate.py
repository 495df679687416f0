"""Benchmark: KV-cache decode tokens/s at batch 1 and 8, ours (jitted while_loop) vs `transformers` generate,
and the memory traffic of one decode step at 7B width.

Speed: same small random Qwen2 weights on both sides, greedy, fixed prompt and output length (no early
stop), fp32. transformers runs with 1 thread and with all cores, and the faster counts. Prints compile
time, steady-state tokens/s and the ratio lines `BENCH decode_b*_vs_hf`.

Traffic: `compiled.cost_analysis()` bytes accessed by one jitted decode step (the loop body, cache
donated) of the 7B config cut to 2 layers, batch 8, cache 8,192 slots, lowered from ShapeDtypeStructs
(nothing 7B-sized is allocated), divided by what a step must read: every weight plus the whole cache.
`BENCH decode_step_bytes_ratio` (fp32) and `BENCH decode_step_bytes_ratio_bf16_cpu`. Two host-compiler
facts shape the measurement: XLA's cost analysis counts a while-loop body once, so the layers are
unrolled here (scan_layers=False) to count each, and the cache is read as one block (a full
cache: the worst case of the filled-blocks loop, kv_cache.decode_attention); and the CPU backend computes bf16 dots and
dynamic-(update-)slices in f32 by converting whole operands (weights, cache) around them, traffic no
GPU/TPU step has, which is why the fp32 figure is the headline and the bf16 one is for reference.
The embedding gather is counted by the cost model as reading the whole table, and the table is in
"every weight" too.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "generate"))

from conftest import params_from_torch, torch_qwen2  # noqa: E402  (test helper: HF -> JAX weights)

from vsalmonn_jax.config import load_config  # noqa: E402
from vsalmonn_jax.generate.decode import decode_step, generate  # noqa: E402
from vsalmonn_jax.models.kv_cache import init_cache  # noqa: E402
from vsalmonn_jax.models.qwen2 import Qwen2, Qwen2Config  # noqa: E402

SMALL = Qwen2Config(vocab_size=4096, hidden_size=256, intermediate_size=704, num_layers=4,
                    num_heads=8, num_kv_heads=2, head_dim=32, rope_theta=1e4)


def _time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def bench_batch(hf, model, variables, batch: int, prompt_len: int, new: int, repeats: int) -> dict:
    import torch

    rng = np.random.default_rng(batch)
    ids = rng.integers(1, SMALL.vocab_size, (batch, prompt_len)).astype(np.int32)
    jids = jnp.asarray(ids)

    def ours():
        generate(model, variables, input_ids=jids, max_new_tokens=new).tokens.block_until_ready()

    start = time.perf_counter()
    ours()
    first = time.perf_counter() - start
    ours_s = _time(ours, repeats)
    tids = torch.tensor(ids, dtype=torch.long)

    def theirs():
        with torch.no_grad():
            hf.generate(tids, attention_mask=torch.ones_like(tids), max_new_tokens=new,
                        min_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)

    hf_s, hf_threads = float("inf"), 0
    for threads in sorted({1, os.cpu_count() or 1}):  # the baseline gets its faster thread count
        torch.set_num_threads(threads)
        theirs()  # warm-up
        seconds = _time(theirs, repeats)
        if seconds < hf_s:
            hf_s, hf_threads = seconds, threads
    tokens = batch * new
    return {"compile_s": first - ours_s, "ours_tps": tokens / ours_s, "hf_tps": tokens / hf_s,
            "hf_threads": hf_threads}


def decode_step_bytes(dtype: str, batch: int = 8, slots: int = 8192, layers: int = 2) -> dict:
    """Bytes accessed by one compiled decode step of the 7B-width model vs weights + cache bytes."""
    import functools

    import flax.linen as nn

    llm = load_config("7b").model.llm
    # attention_block = slots: the step reads the whole (full) cache in one block, which the cost
    # model counts exactly; with smaller blocks it would count one block of the filled-slots loop
    llm.update(dict(num_layers=layers, dtype=dtype, param_dtype=dtype, scan_layers=False,
                    attention_block=slots))
    config = Qwen2Config.from_config(llm)
    model = Qwen2(config)
    params = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
    cache = jax.eval_shape(lambda: init_cache(config, batch, slots, jnp.dtype(dtype)))
    token = jax.ShapeDtypeStruct((batch,), jnp.int32)
    step = jax.jit(functools.partial(decode_step, model), donate_argnums=1)
    compiled = step.lower(params, cache, token, token).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
    weights, kv = nbytes(params), nbytes((cache["k"], cache["v"]))
    step_bytes = float(cost["bytes accessed"])
    return {"step": step_bytes, "weights": weights, "cache": kv, "ratio": step_bytes / (weights + kv),
            "temp": compiled.memory_analysis().temp_size_in_bytes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--bytes-only", action="store_true", help="only the decode-step traffic lines")
    args = parser.parse_args(argv)
    if not args.bytes_only:
        speed(args)
    for dtype, name in (("float32", "decode_step_bytes_ratio"), ("bfloat16", "decode_step_bytes_ratio_bf16_cpu")):
        r = decode_step_bytes(dtype)
        print(f"decode step, 7B width, 2 layers, batch 8, cache 8192, {dtype}: "
              f"{r['step'] / 1e9:.3f} GB accessed; weights {r['weights'] / 1e9:.3f} GB + cache "
              f"{r['cache'] / 1e9:.3f} GB; temp {r['temp'] / 1e9:.3f} GB")
        print(f"BENCH {name} {r['ratio']:.3f}")
    return 0


def speed(args) -> None:
    import torch

    hf = torch_qwen2(SMALL, init_std=0.02)
    model = Qwen2(SMALL)
    variables = {"params": params_from_torch(hf, SMALL)}
    print(f"config: {SMALL}\njax {jax.__version__} on {jax.devices()[0].platform}, torch "
          f"{torch.__version__}; prompt {args.prompt_len}, "
          f"new tokens {args.new_tokens}, best of {args.repeats}")
    ratios = {}
    for batch in (1, 8):
        r = bench_batch(hf, model, variables, batch, args.prompt_len, args.new_tokens, args.repeats)
        ratios[batch] = r["ours_tps"] / r["hf_tps"]
        print(f"batch {batch}: ours {r['ours_tps']:.1f} tok/s (compile {r['compile_s']:.1f} s), "
              f"transformers {r['hf_tps']:.1f} tok/s ({r['hf_threads']} threads), ratio {ratios[batch]:.2f}x")
    print(f"BENCH decode_b8_vs_hf {ratios[8]:.3f}")
    print(f"BENCH decode_b1_vs_hf {ratios[1]:.3f}")


if __name__ == "__main__":
    sys.exit(main())
