"""TPU splash attention (Pallas) behind the MaskSpec interface; runs on CPU with interpret=True (tests).

Causal / full masks are static splash masks; padding and packed segments become splash segment ids.
Under a mesh, a shard_map splits batch and heads as the logical axis rules do where those axes divide
them (shards.py; else that dimension is replicated); T stays whole.
The shared-prefix branch mask is not expressible here (dispatch refuses it before tracing).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec as P

from vsalmonn_jax.models import shards
from vsalmonn_jax.models.attention.mask import MaskSpec

LANE = 128  # splash block sizes are multiples of the TPU lane width
PAD_SEGMENT = -1  # segment id of padding tokens (user segment ids are >= 0)


def _kernel(length: int, heads: int, causal: bool, block: int, interpret: bool):
    """A splash kernel for (padded length, heads, mask, block). Built per trace, not cached: its mask
    info arrays belong to the trace that made them (a cached kernel leaks tracers into nn.scan)."""
    one = splash.CausalMask((length, length)) if causal else splash.FullMask((length, length))
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block,
                              block_kv_dq=block)
    return splash.make_splash_mha(splash.MultiHeadMask([one] * heads), head_shards=1, q_seq_shards=1,
                                  block_sizes=sizes, interpret=interpret)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, spec: MaskSpec, block: int = 512,
                     scale: float | None = None, interpret: bool = False) -> jax.Array:
    """q [B,T,N,D], k/v [B,T,K,D] (self-attention, N % K == 0) -> [B,T,N,D].

    T is padded to a multiple of the block (a multiple of 128); padding keys get their own segment,
    so valid queries never see them. Splash does not scale q: it is scaled here.
    """
    if spec.branch_ids is not None:
        raise ValueError("splash attention cannot express the shared-prefix (branch_ids) mask; "
                         "use attention_impl='xla' for prefix-packed sequences")
    batch, length, heads, dim = q.shape
    scale = dim**-0.5 if scale is None else scale
    block = max(LANE, -(-min(block, length) // LANE) * LANE)
    padded = -(-length // block) * block
    pad = padded - length
    segments = None
    if spec.key_mask is not None or spec.segment_ids is not None or pad:
        ids = jnp.zeros((batch, length), jnp.int32) if spec.segment_ids is None else spec.segment_ids.astype(jnp.int32)
        if spec.key_mask is not None:
            ids = jnp.where(spec.key_mask.astype(bool), ids, PAD_SEGMENT)
        segments = jnp.pad(ids, ((0, 0), (0, pad)), constant_values=PAD_SEGMENT)  # [B,Tp]
    heads_first = lambda x: jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)  # [B,H,Tp,D]
    qs, ks, vs = heads_first(q * jnp.asarray(scale, q.dtype)), heads_first(k), heads_first(v)

    def local(qs, ks, vs, segments):  # one device's [b, h, Tp, D] (a Pallas call is not auto-sharded)
        kernel = _kernel(padded, qs.shape[1], spec.causal, block, interpret)
        if segments is None:
            return jax.vmap(kernel)(qs, ks, vs)
        return jax.vmap(lambda a, b, c, s: kernel(a, b, c, segment_ids=splash.SegmentIds(s, s)))(qs, ks, vs, segments)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        out = local(qs, ks, vs, segments)
    else:  # batch and heads split as the logical rules split the activations; T whole per device
        batch_axes = shards.batch_axes(batch) or None
        head_axes = shards.mesh_axes("activation_heads", k.shape[2]) or None  # K | N: both split
        heads_spec = P(batch_axes, head_axes, None, None)
        out = jax.shard_map(local, mesh=mesh, check_vma=False,
                            in_specs=(heads_spec, heads_spec, heads_spec, None if segments is None else P(batch_axes, None)),
                            out_specs=heads_spec)(qs, ks, vs, segments)
    return out.transpose(0, 2, 1, 3)[:, :length]  # [B,T,N,D]
