"""Prefill throughput of our jitted Qwen2 forward vs transformers PyTorch on the same small config.

Run: .venv/bin/python bench/llm_forward.py [--layers 4 --hidden 512 --seq 2048 --batch 2]
Prints tokens/s for both, the ratio, achieved FLOP/s over this CPU's fp32 matmul peak, and a coarse
breakdown of where our time goes. Ends with `BENCH prefill_vs_torch <ours/PyTorch tokens/s>`.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from common import add_llm_shape_args, bench_line, best_time, matmul_peak_flops  # noqa: E402

from vsalmonn_jax.models.decoder_layers import causal_attention  # noqa: E402
from vsalmonn_jax.models.qwen2 import Qwen2  # noqa: E402
from vsalmonn_jax.models.qwen2_hf import config_from_hf, read_params  # noqa: E402
from vsalmonn_jax.safetensors_io import SafetensorsReader  # noqa: E402


def forward_flops(layers, hidden, inter, heads, kv_heads, head_dim, vocab, batch, seq) -> float:
    """Matmul FLOPs of one forward (attention scores counted in full: XLA computes the masked half)."""
    proj = hidden * (heads * head_dim) * 2 + hidden * (kv_heads * head_dim) * 2 + 3 * hidden * inter
    attn = 2 * seq * heads * head_dim  # QK^T and PV per token
    per_token = 2 * (layers * (proj + attn) + hidden * vocab)
    return per_token * batch * seq


def main() -> None:
    p = argparse.ArgumentParser()
    add_llm_shape_args(p, seq=2048)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--block", type=int, default=256, help="query block of our causal attention")
    args = p.parse_args()
    torch.manual_seed(0)
    hf_config = transformers.Qwen2Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.inter,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, max_position_embeddings=args.seq, attn_implementation="sdpa")
    hf = transformers.Qwen2ForCausalLM(hf_config).eval()
    ids_np = np.random.default_rng(0).integers(0, args.vocab, (args.batch, args.seq))
    ids_torch = torch.as_tensor(ids_np)

    def torch_forward():
        with torch.inference_mode():
            return hf(input_ids=ids_torch, use_cache=False).logits

    t_torch = best_time(torch_forward, args.repeats)

    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        config = config_from_hf(hf.config.to_dict(), dtype="float32", param_dtype="float32",
                                scan_layers=True, remat_policy="none", attention_block=args.block)
        model = Qwen2(config)
        abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))
        import flax.linen as nn
        params = read_params(SafetensorsReader(tmp), config, nn.unbox(abstract)["params"])
    ids = jnp.asarray(ids_np, jnp.int32)
    forward = jax.jit(lambda p, x: model.apply({"params": p}, x)[0])
    ours = np.asarray(forward(params, ids))
    ref = torch_forward().numpy()
    max_err = float(np.abs(ours - ref).max())
    t_ours = best_time(lambda: forward(params, ids), args.repeats)

    # coarse breakdown: the lm_head alone and one layer's attention core alone
    hidden = jnp.zeros((args.batch, args.seq, args.hidden), jnp.float32)
    head = jax.jit(lambda p, h: model.apply({"params": p}, h, method="lm_logits"))
    t_head = best_time(lambda: head(params, hidden), args.repeats)
    head_dim = args.hidden // args.heads
    q = jnp.ones((args.batch, args.seq, args.heads, head_dim), jnp.float32)
    kv = jnp.ones((args.batch, args.seq, args.kv_heads, head_dim), jnp.float32)
    key_mask = jnp.ones((args.batch, args.seq), bool)
    attn = jax.jit(lambda q, k: causal_attention(q, k, k, key_mask, config.attention_block))
    t_attn = best_time(lambda: attn(q, kv), args.repeats) * args.layers

    tokens = args.batch * args.seq
    flops = forward_flops(args.layers, args.hidden, args.inter, args.heads, args.kv_heads, head_dim,
                          args.vocab, args.batch, args.seq)
    peak = matmul_peak_flops()
    print(f"config: layers {args.layers}, hidden {args.hidden}, heads {args.heads}/{args.kv_heads}, "
          f"inter {args.inter}, vocab {args.vocab}, batch {args.batch}, seq {args.seq}; "
          f"threads: torch {torch.get_num_threads()}, cpus {os.cpu_count()}")
    print(f"max |logits ours - torch| = {max_err:.2e}")
    print(f"torch  : {t_torch * 1e3:8.1f} ms  {tokens / t_torch:10.0f} tokens/s")
    print(f"ours   : {t_ours * 1e3:8.1f} ms  {tokens / t_ours:10.0f} tokens/s")
    print(f"where ours goes: lm_head {t_head / t_ours:.0%}, attention core {t_attn / t_ours:.0%}, "
          f"rest (projections, MLP, norms, RoPE) {1 - (t_head + t_attn) / t_ours:.0%}")
    print(f"achieved {flops / t_ours / 1e9:.1f} GFLOP/s = {flops / t_ours / peak:.0%} of the measured "
          f"fp32 matmul peak {peak / 1e9:.1f} GFLOP/s (torch: {flops / t_torch / peak:.0%})")
    bench_line("prefill_vs_torch", t_torch / t_ours)


if __name__ == "__main__":
    main()
