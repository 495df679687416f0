"""Plain jnp attention over the dense mask: the ground truth for tests and the baseline for bench/.

O(T*S) memory by construction; never used by the model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vsalmonn_jax.models.attention.mask import MaskSpec


def reference_attention(q: jax.Array, k: jax.Array, v: jax.Array, spec: MaskSpec,
                        scale: float | None = None) -> jax.Array:
    """q [B,T,N,D], k/v [B,S,K,D] (N % K == 0) -> [B,T,N,D]; fp32 softmax; rows with no visible
    key give zeros (like every backend here)."""
    batch, length, heads, dim = q.shape
    kv_heads = k.shape[2]
    scale = dim**-0.5 if scale is None else scale
    qg = q.reshape(batch, length, kv_heads, heads // kv_heads, dim)  # [B,T,K,G,D]
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    allowed = spec.dense(length, k.shape[1])[:, None, None]  # [B,1,1,T,S]
    scores = jnp.where(allowed, scores, -jnp.inf)
    top = jnp.max(scores, axis=-1, keepdims=True)
    probs = jnp.where(allowed, jnp.exp(scores - jnp.where(jnp.isfinite(top), top, 0.0)), 0.0)
    total = jnp.sum(probs, axis=-1, keepdims=True)
    probs = probs / jnp.where(total == 0, 1.0, total)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(batch, length, heads, dim).astype(q.dtype)
