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


def decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, filled=None,
                     block: int = 512) -> jax.Array:
    """Attention of a few new queries over one layer's cache.

    q [B,T,N,D] (T small: one decode step), k/v [B,K,S,D] in the cache's layout (GQA: N % K == 0),
    mask [B,T,S] bool (valid and causal slots) -> [B,T,N,D]. Both products read the cache in its
    own layout (no transpose of k/v); scores and statistics in fp32, normalised after the PV product.
    With `filled` (slots in use: the write index + T) and a cache longer than `block`, only the
    ceil(filled / block) blocks holding tokens are read (online softmax over a while loop), so a
    step early in a long generation does not touch the empty end of the cache.
    """
    batch, length, heads, dim = q.shape
    kv_heads, slots = k.shape[1], k.shape[2]
    qg = (q * dim**-0.5).reshape(batch, length, kv_heads, heads // kv_heads, dim)   # [B,T,K,G,D]
    if filled is None or slots <= block:
        out, total, _ = _attend_block(qg, k, v, mask[:, None, None], zero_masked=False)
        out = out / total                                                        # [B,K,G,T,D]
    else:
        out = _attend_filled(qg, k, v, mask, filled, block)
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, length, heads, dim).astype(q.dtype)


def _attend_block(qg, k, v, mask, zero_masked: bool = True):
    """Unnormalised attention of qg [B,T,K,G,D] over k/v [B,K,s,D] under mask (broadcast to
    [B,K,G,T,s]) -> (sum p v [B,K,G,T,D], sum p [B,K,G,T,1], max score [B,K,G,T,1]), fp32.
    `zero_masked`: a block with no visible slot adds nothing (else its row averages v, as a fully
    masked row of a single block always did)."""
    scores = jnp.einsum("btkgd,bksd->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    top = jnp.max(scores, axis=-1, keepdims=True)
    probs = jnp.exp(scores - top)
    if zero_masked:
        probs = jnp.where(mask, probs, 0.0)
    out = jnp.einsum("bkgts,bksd->bkgtd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out, jnp.sum(probs, axis=-1, keepdims=True), top


def _attend_filled(qg, k, v, mask, filled, block: int):
    """decode_attention over the blocks [0, ceil(filled / block)) of the cache, online softmax."""
    batch, length, kv_heads, groups, dim = qg.shape
    slots = k.shape[2]
    count = (jnp.minimum(jnp.asarray(filled, jnp.int32), slots) + block - 1) // block

    def body(i, carry):
        acc, total, top = carry
        start = jnp.minimum(i * block, slots - block)       # the last block may overlap the one before
        ids = start + jnp.arange(block)
        seen = (ids >= i * block)[None, None, :]             # [1,1,s]: slots no earlier block counted
        kb = jax.lax.dynamic_slice_in_dim(k, start, block, axis=2)               # [B,K,s,D]
        vb = jax.lax.dynamic_slice_in_dim(v, start, block, axis=2)
        mb = jax.lax.dynamic_slice_in_dim(mask, start, block, axis=2) & seen      # [B,T,s]
        out, part, new_top = _attend_block(qg, kb, vb, mb[:, None, None])
        top2 = jnp.maximum(top, new_top)
        old, new = jnp.exp(top - top2), jnp.exp(new_top - top2)
        return acc * old + out * new, total * old + part * new, top2

    shape = (batch, kv_heads, groups, length)
    init = (jnp.zeros((*shape, dim), jnp.float32), jnp.zeros((*shape, 1), jnp.float32),
            jnp.full((*shape, 1), jnp.finfo(jnp.float32).min, jnp.float32))
    acc, total, _ = jax.lax.fori_loop(0, count, body, init)
    return acc / jnp.maximum(total, jnp.finfo(jnp.float32).tiny)


def slot_mask(cache_mask: jax.Array, index, length: int) -> jax.Array:
    """bool [B,T,S]: query t (at slot index + t) sees the valid slots up to its own."""
    slots = jnp.arange(cache_mask.shape[1])
    causal = slots[None, :] <= (index + jnp.arange(length))[:, None]             # [T,S]
    return causal[None] & cache_mask[:, None, :]
