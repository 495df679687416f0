"""GPU cuDNN fused attention behind the MaskSpec interface: mask *type* and sequence lengths only.

No dense [T, S] mask or bias ever reaches cuDNN (that would be O(T^2) memory and no causal skipping).
Segments and the shared-prefix mask are not expressible through jax.nn.dot_product_attention (dispatch
refuses them before tracing).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vsalmonn_jax.models.attention.mask import MaskSpec


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, spec: MaskSpec,
                    scale: float | None = None) -> jax.Array:
    """q [B,T,N,D], k/v [B,S,K,D] (bf16/fp16 on GPU) -> [B,T,N,D].

    Padding goes to cuDNN as lengths (valid tokens first: right padding). A key_mask that is not a
    valid prefix of each row (left padding, holes) cannot be expressed as a length: those rows come
    back as NaN so the error is loud, never a silently wrong attention. Rows of no valid token are
    zeros.
    """
    if spec.segment_ids is not None or spec.branch_ids is not None:
        raise ValueError("cudnn attention supports causal and padding masks only (no segment_ids / "
                         "branch_ids); use attention_impl='xla' for packed or prefix-shared sequences")
    lengths = None
    if spec.key_mask is not None:
        key_mask = spec.key_mask.astype(bool)
        lengths = jnp.sum(key_mask, axis=-1, dtype=jnp.int32)  # [B]
        right_padded = jnp.all(key_mask == (jnp.arange(key_mask.shape[1]) < lengths[:, None]), axis=-1)
    # a row of no valid token goes to cuDNN as length 1 (its softmax, forward and backward, over
    # zero keys is undefined) and comes back as zeros below
    given = None if lengths is None else jnp.maximum(lengths, 1)
    out = jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=spec.causal,
                                       query_seq_lengths=given, key_value_seq_lengths=given,
                                       implementation="cudnn")
    if lengths is None:
        return out
    # a row without a valid token (a CE-only row's absent pair, a padding row) is zeros, as on the
    # xla path: cuDNN's softmax over zero keys is undefined, and a NaN there would reach the loss
    out = jnp.where((lengths > 0)[:, None, None, None], out, 0)
    return jnp.where(right_padded[:, None, None, None], out, jnp.nan).astype(out.dtype)
