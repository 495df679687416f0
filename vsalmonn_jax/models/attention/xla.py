"""Flash-style blockwise attention in plain XLA (any device; the default on CPU).

custom_vjp: the forward saves only its output and the log-sum-exp; the backward recomputes each block.
Both walk (query block, key block) pairs in lax loops with a block size fixed by config, skip pairs the
mask hides entirely (the causal upper triangle, other segments / branches, padding), so memory is
O(T * block) in the forward and the backward. GQA: the G query heads of a kv head share its K/V.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from vsalmonn_jax.loop_trips import counted_while
from vsalmonn_jax.models.attention.mask import MaskSpec
from vsalmonn_jax.models.shards import batch_axes

# Per-token mask inputs after padding to a multiple of the block: (key_valid [B,Sp] bool,
# query side (segment_ids [B,Tp] | None, branch_ids [B,Tp] | None, index [Tp] | None),
# key side (segment_ids [B,Sp] | None, branch_ids [B,Sp] | None, index [Sp] | None)).
# index = each token's place in the natural (causal) order; None = its packed position (self-attention).
Tokens = tuple


def _slice(x: jax.Array, index, block: int, axis: int) -> jax.Array:
    return jax.lax.dynamic_slice_in_dim(x, index * block, block, axis=axis)


def _add_slice(x: jax.Array, update: jax.Array, index, block: int, axis: int) -> jax.Array:
    return jax.lax.dynamic_update_slice_in_dim(x, _slice(x, index, block, axis) + update, index * block, axis)


def _order(index, i, block: int) -> jax.Array:
    """Natural-order indices of block i: [block]."""
    return i * block + jnp.arange(block) if index is None else _slice(index, i, block, 0)


def _block_mask(tokens: Tokens, causal: bool, i, j, block: int) -> jax.Array:
    """Visibility of key block j from query block i: [B,1,1,bq,bk] bool."""
    key_valid, (q_segment, q_branch, q_index), (k_segment, k_branch, k_index) = tokens
    allowed = _slice(key_valid, j, block, 1)[:, None, :]  # [B,1,bk]
    if causal:
        allowed = allowed & (_order(k_index, j, block)[None, :] <= _order(q_index, i, block)[:, None])[None]
    if q_segment is not None:
        allowed = allowed & (_slice(q_segment, i, block, 1)[:, :, None] == _slice(k_segment, j, block, 1)[:, None, :])
    if q_branch is not None:
        key_branch = _slice(k_branch, j, block, 1)[:, None, :]
        allowed = allowed & ((key_branch == 0) | (key_branch == _slice(q_branch, i, block, 1)[:, :, None]))
    return allowed[:, None, None]  # [B,1,1,bq,bk]


def _triangular(tokens: Tokens, causal: bool) -> bool:
    """Causal in packed order (no index arrays): key block j > query block i is never visible."""
    return causal and tokens[1][2] is None


def _inner_loop(lower, upper, body, init, causal: bool, blocks: int):
    """fori_loop over the other side's blocks as a while loop (a static-bound fori_loop becomes a scan,
    and a scan nested in the layer scan / remat stacks each block pair's scores and mask: O(T^2)
    memory). For `plan`'s FLOPs it visits (blocks + 1) / 2 blocks on average when causal (exact for a
    causal triangle; packed / prefix / padded rows skip more, data-dependently), all when not."""
    return counted_while(lower, upper, body, init, (blocks + 1) / 2 if causal else blocks)


def _scores(q_block, k_block, scale):
    # [B,K,G,bq,D] x [B,K,bk,D] -> [B,K,G,bq,bk] fp32
    return jnp.einsum("bkgqd,bkcd->bkgqc", q_block, k_block, preferred_element_type=jnp.float32) * scale


def _forward(q, k, v, tokens, causal, block, scale):
    """q [B,K,G,Tp,D], k/v [B,K,Sp,D] -> out [B,K,G,Tp,D] (q dtype), lse [B,K,G,Tp] fp32."""
    num_blocks, num_key_blocks = q.shape[3] // block, k.shape[2] // block
    row_shape = q.shape[:3] + (block,)  # [B,K,G,bq]

    def query_block(i, carry):
        out, lse = carry
        q_i = _slice(q, i, block, 3)

        def key_block(j, state):
            mask = _block_mask(tokens, causal, i, j, block)

            def visit(state):
                top, total, acc = state
                s = jnp.where(mask, _scores(q_i, _slice(k, j, block, 2), scale), -jnp.inf)
                new_top = jnp.maximum(top, jnp.max(s, axis=-1))
                safe_top = jnp.where(jnp.isfinite(new_top), new_top, 0.0)
                p = jnp.exp(s - safe_top[..., None])  # masked -> exp(-inf) = 0
                decay = jnp.exp(top - safe_top)
                total = decay * total + jnp.sum(p, axis=-1)
                pv = jnp.einsum("bkgqc,bkcd->bkgqd", p.astype(v.dtype), _slice(v, j, block, 2),
                                preferred_element_type=jnp.float32)
                return new_top, total, decay[..., None] * acc + pv

            return jax.lax.cond(jnp.any(mask), visit, lambda s: s, state)

        init = (jnp.full(row_shape, -jnp.inf, jnp.float32), jnp.zeros(row_shape, jnp.float32),
                jnp.zeros(row_shape + (q.shape[-1],), jnp.float32))
        top, total, acc = _inner_loop(0, i + 1 if _triangular(tokens, causal) else num_key_blocks,
                                      key_block, init, causal, num_key_blocks)
        empty = total == 0  # no visible key: zero output, lse 0 (the backward masks p anyway)
        o_i = acc / jnp.where(empty, 1.0, total)[..., None]
        lse_i = jnp.where(empty, 0.0, top + jnp.log(jnp.where(empty, 1.0, total)))
        out = jax.lax.dynamic_update_slice_in_dim(out, o_i.astype(q.dtype), i * block, axis=3)
        lse = jax.lax.dynamic_update_slice_in_dim(lse, lse_i, i * block, axis=3)
        return out, lse

    init = (jnp.zeros(q.shape, q.dtype), jnp.zeros(q.shape[:4], jnp.float32))
    return jax.lax.fori_loop(0, num_blocks, query_block, init)


def _backward(q, k, v, tokens, out, lse, d_out, causal, block, scale):
    """Recompute each visible block's probabilities from lse; dq, dk, dv in fp32 accumulators."""
    num_blocks, num_key_blocks = q.shape[3] // block, k.shape[2] // block
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B,K,G,Tp]
    kv_block_shape = k.shape[:2] + (block, k.shape[-1])  # [B,K,bk,D]

    def key_block(j, carry):
        dq, dk, dv = carry
        k_j, v_j = _slice(k, j, block, 2), _slice(v, j, block, 2)

        def query_block(i, state):
            mask = _block_mask(tokens, causal, i, j, block)

            def visit(state):
                dq, dk_j, dv_j = state
                q_i, do_i = _slice(q, i, block, 3), _slice(d_out, i, block, 3)
                p = jnp.where(mask, jnp.exp(_scores(q_i, k_j, scale) - _slice(lse, i, block, 3)[..., None]), 0.0)
                dv_j = dv_j + jnp.einsum("bkgqc,bkgqd->bkcd", p.astype(do_i.dtype), do_i,
                                         preferred_element_type=jnp.float32)
                dp = jnp.einsum("bkgqd,bkcd->bkgqc", do_i, v_j, preferred_element_type=jnp.float32)
                ds = p * (dp - _slice(delta, i, block, 3)[..., None]) * scale  # d scores (pre-scale)
                dq_i = jnp.einsum("bkgqc,bkcd->bkgqd", ds.astype(k_j.dtype), k_j, preferred_element_type=jnp.float32)
                dk_j = dk_j + jnp.einsum("bkgqc,bkgqd->bkcd", ds.astype(q_i.dtype), q_i,
                                         preferred_element_type=jnp.float32)
                return _add_slice(dq, dq_i, i, block, 3), dk_j, dv_j

            return jax.lax.cond(jnp.any(mask), visit, lambda s: s, state)

        zeros = jnp.zeros(kv_block_shape, jnp.float32)
        dq, dk_j, dv_j = _inner_loop(j if _triangular(tokens, causal) else 0, num_blocks, query_block,
                                     (dq, zeros, zeros), causal, num_blocks)
        dk = jax.lax.dynamic_update_slice_in_dim(dk, dk_j, j * block, axis=2)
        dv = jax.lax.dynamic_update_slice_in_dim(dv, dv_j, j * block, axis=2)
        return dq, dk, dv

    init = (jnp.zeros(q.shape, jnp.float32), jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    dq, dk, dv = jax.lax.fori_loop(0, num_key_blocks, key_block, init)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _flash(q, k, v, tokens, causal, block, scale):
    return _forward(q, k, v, tokens, causal, block, scale)[0]


def _flash_fwd(q, k, v, tokens, causal, block, scale):
    out, lse = _forward(q, k, v, tokens, causal, block, scale)
    return out, (q, k, v, tokens, out, lse)


def _flash_bwd(causal, block, scale, residuals, d_out):
    q, k, v, tokens, out, lse = residuals
    dq, dk, dv = _backward(q, k, v, tokens, out, lse, d_out, causal, block, scale)
    return dq, dk, dv, jax.tree_util.tree_map(lambda _: None, tokens)


_flash.defvjp(_flash_fwd, _flash_bwd)


def _pad_axis(x: jax.Array, pad: int, axis: int, value=0) -> jax.Array:
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_valid: jax.Array, query_side: tuple,
                    key_side: tuple, causal: bool, block: int = 512, scale: float | None = None) -> jax.Array:
    """q [B,T,N,D], k/v [B,S,K,D] (N % K == 0), key_valid [B,S] bool -> [B,T,N,D].

    query_side / key_side = (segment_ids [B,T|S] | None, branch_ids | None, index [T|S] | None): the
    MaskSpec rule with each side's own ids; `index` gives each token's natural-order place for the
    causal test (context.py's load-balanced shards), None = packed order (then T == S). Both lengths
    are padded internally to a multiple of the block (padded keys masked, padded rows dropped).
    """
    batch, length, heads, dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    if heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of kv heads ({kv_heads})")
    if query_side[2] is None and causal and kv_len != length:
        raise ValueError(f"causal attention in packed order needs as many keys ({kv_len}) as queries "
                         f"({length}); give index arrays otherwise")
    scale = dim**-0.5 if scale is None else scale
    block = min(block, -(-max(length, kv_len) // 8) * 8)
    pad_q, pad_k = -length % block, -kv_len % block
    pad_side = lambda side, pad: tuple(None if x is None else _pad_axis(x, pad, x.ndim - 1) for x in side)
    tokens = (_pad_axis(key_valid.astype(bool), pad_k, 1, False), pad_side(query_side, pad_q),
              pad_side(key_side, pad_k))
    qg = q.reshape(batch, length, kv_heads, heads // kv_heads, dim).transpose(0, 2, 3, 1, 4)  # [B,K,G,T,D]
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B,K,S,D]
    out = _flash(_pad_axis(qg, pad_q, 3), _pad_axis(kt, pad_k, 2), _pad_axis(vt, pad_k, 2), tokens,
                 causal, block, scale)[:, :, :, :length]  # [B,K,G,T,D]
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, length, heads, dim)


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, spec: MaskSpec, block: int = 512,
                  scale: float | None = None) -> jax.Array:
    """q [B,T,N,D], k/v [B,T,K,D] (self-attention, N % K == 0) -> [B,T,N,D].

    T is padded internally to a multiple of the block (padded keys are masked, padded rows dropped);
    sequences shorter than `block` use one block of their own length (rounded up to 8).
    Under a mesh, a shard_map over the batch axes (shards.batch_axes; the rest stays automatic): each
    device decides which of its own block pairs to skip, with no collective inside the block loops (an
    automatically partitioned `cond` would all-reduce its predicate over the batch shards at every
    block pair of every layer).
    """
    batch, length = q.shape[:2]
    if k.shape[1] != length:
        raise ValueError(f"xla attention is self-attention: q has {length} tokens, k/v {k.shape[1]}")
    key_valid = jnp.ones((batch, length), bool) if spec.key_mask is None else spec.key_mask
    side = (spec.segment_ids, spec.branch_ids)

    def local(q, k, v, key_valid, side):
        ids = (*side, None)
        return flash_attention(q, k, v, key_valid, ids, ids, spec.causal, block, scale)

    rows = batch_axes(batch)
    if not rows:
        return local(q, k, v, key_valid, side)
    split = P(rows)
    return jax.shard_map(local, mesh=jax.sharding.get_abstract_mesh(), check_vma=False,
                         in_specs=(split, split, split, split, tuple(None if x is None else split for x in side)),
                         out_specs=split, axis_names=frozenset(rows))(q, k, v, key_valid, side)
