"""Context parallelism: attention over a sequence split on the mesh's `context` axis (all-gather K/V).

Tokens arrive in mask.balanced_layout (shard i holds chunks i and 2C-1-i of 2C), so causal work is
equal per shard; each shard's queries attend to K/V all-gathered over `context` with the xla kernel,
masked by the tokens' natural-order indices. MaxText's all-gather context-parallel strategy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from vsalmonn_jax.models.attention.mask import MaskSpec, natural_order
from vsalmonn_jax.models.attention.xla import flash_attention
from vsalmonn_jax.models.shards import batch_axes

AXIS = "context"


def context_size() -> int:
    """Shards of the `context` axis of the mesh in scope (jax.set_mesh); 1 without one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or AXIS not in mesh.axis_names:
        return 1
    return int(mesh.shape[AXIS])


def padded_length(length: int, parts: int) -> int:
    """The sequence length rounded up to a multiple of 2 * parts (balanced_layout's chunks)."""
    return -(-length // (2 * parts)) * (2 * parts)


def _local_order(length: int, parts: int) -> jax.Array:
    """[length / parts] natural-order indices of this shard's tokens (inside the shard_map)."""
    chunk = length // (2 * parts)
    shard = jax.lax.axis_index(AXIS)
    ramp = jnp.arange(chunk, dtype=jnp.int32)
    return jnp.concatenate([shard * chunk + ramp, (2 * parts - 1 - shard) * chunk + ramp])


@jax.custom_vjp
def _gather_kv(x: jax.Array) -> jax.Array:
    """All-gather K or V [b, T/C, K, D] over `context` -> [b, T, K, D]. Its backward reduce-scatters the
    gradient in fp32: the exact sum of the shards' partial dK / dV (and XLA:CPU cannot reduce-scatter
    bf16: "Invalid binary instruction opcode copy")."""
    return jax.lax.all_gather(x, AXIS, axis=1, tiled=True)


def _gather_kv_fwd(x):
    return _gather_kv(x), None


def _gather_kv_bwd(_, grad):
    summed = jax.lax.psum_scatter(grad.astype(jnp.float32), AXIS, scatter_dimension=1, tiled=True)
    return (summed.astype(grad.dtype),)


_gather_kv.defvjp(_gather_kv_fwd, _gather_kv_bwd)


def context_attention(q: jax.Array, k: jax.Array, v: jax.Array, spec: MaskSpec, block: int = 512,
                      scale: float | None = None) -> jax.Array:
    """q [B,T,N,D], k/v [B,T,K,D] in balanced layout over spec.context shards -> [B,T,N,D] (same layout).

    A shard_map over the batch axes and `context` (tensor stays automatic: heads keep their sharding):
    each shard gathers the whole K/V (and key masks), its queries keep their T / C tokens; the
    backward reduce-scatters dK / dV in fp32 (_gather_kv).
    """
    parts = spec.context
    batch, length = q.shape[:2]
    if length % (2 * parts):
        raise ValueError(f"context attention: {length} tokens do not split into 2 x {parts} chunks "
                         "(the model pads to context.padded_length)")
    rows = batch_axes(batch)
    mesh = jax.sharding.get_abstract_mesh()
    seq = P(rows or None, AXIS)
    key_valid = jnp.ones((batch, length), bool) if spec.key_mask is None else spec.key_mask.astype(bool)
    ids = (spec.segment_ids, spec.branch_ids)
    full_order = jnp.asarray(natural_order(length, parts))  # [T] natural index of every gathered key

    def local(q, k, v, key_valid, ids):
        gather = lambda x: None if x is None else jax.lax.all_gather(x, AXIS, axis=1, tiled=True)
        query_side = (*ids, _local_order(length, parts))
        key_side = (*(gather(x) for x in ids), full_order)
        return flash_attention(q, _gather_kv(k), _gather_kv(v), gather(key_valid), query_side, key_side,
                               spec.causal, block, scale)

    id_specs = tuple(None if x is None else seq for x in ids)
    return jax.shard_map(local, mesh=mesh, in_specs=(seq, seq, seq, seq, id_specs), out_specs=seq,
                         axis_names=frozenset(rows) | {AXIS}, check_vma=False)(q, k, v, key_valid, ids)
