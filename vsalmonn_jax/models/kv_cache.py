"""The decoder's KV cache: its layout, in-place writes of new keys/values, and decode attention over it.

k/v are [layers, batch, kv_heads, slots, head_dim]: one layer's slice [B,K,S,D] is what both attention
products read without a transpose, and a write is one `dynamic_update_slice` into the carried buffers.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

SLOT_AXIS = 3   # of k/v [L,B,K,S,D]
HEADS_AXIS = 2


def init_cache(config, batch: int, max_len: int, dtype: Any = None) -> dict:
    """An empty KV cache: k/v [L,B,K,S,D], per-slot validity mask [B,S], shared write index."""
    dtype = dtype or config.dtype
    shape = (config.num_layers, batch, config.num_kv_heads, max_len, config.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "mask": jnp.zeros((batch, max_len), bool), "index": jnp.zeros((), jnp.int32)}


def write(buffer: jax.Array, new: jax.Array, layer, index) -> jax.Array:
    """Write new keys or values [B,T,K,D] at slots [index, index + T) of layer `layer` of the carried
    buffer [L,B,K,S,D], in place (one dynamic_update_slice of a [1,B,K,T,D] update)."""
    update = new.astype(buffer.dtype).transpose(0, 2, 1, 3)[None]     # [1,B,K,T,D]
    zero = jnp.zeros((), jnp.int32)
    start = (jnp.asarray(layer, jnp.int32), zero, zero, jnp.asarray(index, jnp.int32), zero)
    return jax.lax.dynamic_update_slice(buffer, update, start)


def layer_slice(buffer: jax.Array, layer) -> jax.Array:
    """[L,B,K,S,D] -> this layer's [B,K,S,D] (static index for unscanned layers, dynamic under scan)."""
    return jax.lax.dynamic_index_in_dim(buffer, layer, axis=0, keepdims=False)


def decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Attention of a few new queries over one layer's cache.

    q [B,T,N,D] (T small: one decode step), k/v [B,K,S,D] in the cache's layout (GQA: N % K == 0),
    mask [B,T,S] bool (valid and causal slots) -> [B,T,N,D]. Both products read the cache in its
    own layout (no transpose of k/v); scores and statistics in fp32, normalised after the PV product.
    """
    batch, length, heads, dim = q.shape
    kv_heads = k.shape[1]
    qg = (q * dim**-0.5).reshape(batch, length, kv_heads, heads // kv_heads, dim)   # [B,T,K,G,D]
    scores = jnp.einsum("btkgd,bksd->bkgts", qg, k, preferred_element_type=jnp.float32)  # [B,K,G,T,S]
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
    total = jnp.sum(probs, axis=-1, keepdims=True)                               # [B,K,G,T,1]
    out = jnp.einsum("bkgts,bksd->bkgtd", probs.astype(v.dtype), v,
                     preferred_element_type=jnp.float32) / total                 # [B,K,G,T,D]
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, length, heads, dim).astype(q.dtype)


def slot_mask(cache_mask: jax.Array, index, length: int) -> jax.Array:
    """bool [B,T,S]: query t (at slot index + t) sees the valid slots up to its own."""
    slots = jnp.arange(cache_mask.shape[1])
    causal = slots[None, :] <= (index + jnp.arange(length))[:, None]             # [T,S]
    return causal[None] & cache_mask[:, None, :]
