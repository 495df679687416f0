"""The mask every attention backend reads: causal, key padding, packed segments, shared-prefix branches.

A MaskSpec is a pytree (arrays are leaves, `causal` is static), so it crosses jit, nn.scan and vmap.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("padding", "segments", "prefix")  # what a MaskSpec may ask of a backend beyond causal


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """Which keys each query may attend to, described per token (never as a dense [T, S] array).

    A query at index t attends to key s iff every present condition holds:
      causal       s <= t (packed index order)
      key_mask     key_mask[b, s] (False = padding key); [B, S] bool
      segment_ids  segment_ids[b, t] == segment_ids[b, s] (packed sequences); [B, T] int >= 0
      branch_ids   branch_ids[b, s] == 0 or branch_ids[b, s] == branch_ids[b, t]; [B, T] int >= 0.
                   0 marks a shared prefix, 1, 2, ... its continuations: with causal, each
                   continuation token sees the prefix and its own earlier tokens, never another
                   continuation (e.g. [prompt+media | chosen | rejected | GT] = 0 | 1 | 2 | 3).
    segment_ids and branch_ids describe self-attention (T == S). A query row with no visible key
    gives a zero output (and zero gradients).
    context  the tokens (and every array here) are in context.py's load-balanced order over this
             many `context` shards (1 = natural order); "causal" still means the natural order.
    """

    causal: bool = dataclasses.field(default=True, metadata=dict(static=True))
    context: int = dataclasses.field(default=1, metadata=dict(static=True))
    key_mask: jax.Array | None = None
    segment_ids: jax.Array | None = None
    branch_ids: jax.Array | None = None

    def kinds(self) -> frozenset[str]:
        """The mask kinds present (subset of KINDS), for backend support checks."""
        present = {"padding": self.key_mask, "segments": self.segment_ids, "prefix": self.branch_ids}
        return frozenset(kind for kind, value in present.items() if value is not None)

    def dense(self, q_len: int, kv_len: int) -> jax.Array:
        """[B or 1, T, S] bool: the same rule as a dense array (reference and tests only: O(T*S))."""
        allowed = jnp.ones((1, q_len, kv_len), bool)
        if self.causal:
            rows, cols = natural_order(q_len, self.context), natural_order(kv_len, self.context)
            allowed = allowed & (cols[None, :] <= rows[:, None])[None]
        if self.key_mask is not None:
            allowed = allowed & self.key_mask.astype(bool)[:, None, :]
        if self.segment_ids is not None:
            allowed = allowed & (self.segment_ids[:, :, None] == self.segment_ids[:, None, :])
        if self.branch_ids is not None:
            key_branch = self.branch_ids[:, None, :]
            allowed = allowed & ((key_branch == 0) | (key_branch == self.branch_ids[:, :, None]))
        return allowed


def balanced_layout(x, parts: int, axis: int = 1):
    """Natural -> load-balanced order along `axis` (its length a multiple of 2 * parts): the axis is cut
    into 2 * parts chunks and shard i of `parts` gets chunks i and 2 * parts - 1 - i, so every shard
    holds as much causal attention work as any other (MaxText's context-parallel reordering)."""
    if parts == 1:
        return x
    xp = jnp if isinstance(x, jax.Array) else np
    n = x.shape[axis]
    chunks = x.reshape(x.shape[:axis] + (2 * parts, n // (2 * parts)) + x.shape[axis + 1:])
    lead = (slice(None),) * axis
    first = chunks[lead + (slice(0, parts),)]                            # chunks 0 .. parts-1
    second = xp.flip(chunks[lead + (slice(parts, None),)], axis=axis)    # chunks 2p-1 .. parts
    return xp.stack([first, second], axis=axis + 1).reshape(x.shape)   # [.., parts, 2, chunk, ..]


def natural_layout(x, parts: int, axis: int = 1):
    """The inverse of balanced_layout."""
    if parts == 1:
        return x
    xp = jnp if isinstance(x, jax.Array) else np
    n = x.shape[axis]
    pairs = x.reshape(x.shape[:axis] + (parts, 2, n // (2 * parts)) + x.shape[axis + 1:])
    lead = (slice(None),) * (axis + 1)
    first = pairs[lead + (0,)]                                           # chunks 0 .. parts-1
    second = xp.flip(pairs[lead + (1,)], axis=axis)                      # chunks parts .. 2p-1
    return xp.concatenate([first, second], axis=axis).reshape(x.shape)


def natural_order(length: int, parts: int) -> np.ndarray:
    """[length] int32: the natural-order index of each token of the balanced layout."""
    return balanced_layout(np.arange(length, dtype=np.int32)[None], parts)[0]


def causal_padding(key_mask: jax.Array | None) -> MaskSpec:
    """The LLM's usual mask: causal over one sequence with a [B, T] key-padding mask."""
    return MaskSpec(causal=True, key_mask=key_mask)
