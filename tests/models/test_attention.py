"""Our blockwise causal / masked attention equals jax.nn.dot_product_attention (GQA, padding, blocks)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vsalmonn_jax.models.decoder_layers import causal_attention, masked_attention


def _qkv(batch=2, length=70, heads=6, kv_heads=2, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, length, heads, dim), np.float32)
    k = rng.standard_normal((batch, length, kv_heads, dim), np.float32)
    v = rng.standard_normal((batch, length, kv_heads, dim), np.float32)
    key_mask = np.ones((batch, length), bool)
    key_mask[1, 50:] = False  # right padding
    return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(key_mask)


@pytest.mark.parametrize("block,max_blocks", [(16, 16), (64, 16), (256, 16), (8, 3)])
def test_causal_blocks_equal_reference(block, max_blocks):
    q, k, v, key_mask = _qkv()
    length = q.shape[1]
    mask = jnp.tril(jnp.ones((length, length), bool))[None, None] & key_mask[:, None, None, :]
    ref = jax.nn.dot_product_attention(q, k, v, mask=mask)
    ours = causal_attention(q, k, v, key_mask, block=block, max_blocks=max_blocks)
    np.testing.assert_allclose(np.asarray(ours)[key_mask], np.asarray(ref)[key_mask], atol=2e-6)


def test_masked_attention_equals_reference_with_arbitrary_mask():
    q, k, v, _ = _qkv(length=9)
    mask = jnp.asarray(np.random.default_rng(1).random((2, 1, 9, 9)) > 0.3) | jnp.eye(9, dtype=bool)
    ref = jax.nn.dot_product_attention(q, k, v, mask=mask)
    np.testing.assert_allclose(np.asarray(masked_attention(q, k, v, mask)), np.asarray(ref), atol=2e-6)


def test_gradients_match_reference():
    q, k, v, key_mask = _qkv(length=40)
    mask = jnp.tril(jnp.ones((40, 40), bool))[None, None] & key_mask[:, None, None, :]
    w = key_mask[:, :, None, None].astype(jnp.float32)
    ref = jax.grad(lambda q, k, v: jnp.sum(w * jax.nn.dot_product_attention(q, k, v, mask=mask) ** 2),
                   argnums=(0, 1, 2))(q, k, v)
    ours = jax.grad(lambda q, k, v: jnp.sum(w * causal_attention(q, k, v, key_mask, block=16) ** 2),
                    argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
