"""The cudnn backend hands cuDNN a mask type and sequence lengths, never a dense [T, T] mask or bias
(CPU: the call is intercepted); on a GPU it equals xla and its gradient memory grows linearly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vsalmonn_jax.models.attention import MaskSpec, attention
from vsalmonn_jax.models.qwen2 import Qwen2, Qwen2Config

ON_GPU = jax.default_backend() == "gpu"


@pytest.fixture
def cudnn_calls(monkeypatch):
    """Replace jax.nn.dot_product_attention by a recorder returning zeros (cuDNN is GPU-only)."""
    calls = []

    def fake(query, key, value, bias=None, mask=None, **kwargs):
        calls.append(dict(query=query.shape, key=key.shape, bias=bias, mask=mask, **kwargs))
        return jnp.zeros(query.shape, query.dtype)

    monkeypatch.setattr(jax.nn, "dot_product_attention", fake)
    return calls


def _qkv(batch=2, length=12, heads=4, kv_heads=2, dim=8):
    rng = np.random.default_rng(0)
    return (jnp.asarray(rng.standard_normal((batch, length, h, dim), np.float32)) for h in (heads, kv_heads, kv_heads))


def test_padding_goes_as_lengths_and_causal_as_mask_type(cudnn_calls):
    key_mask = np.ones((3, 12), bool)
    key_mask[1, 9:] = False   # right padding: a length
    key_mask[2, :2] = False   # left padding: not a length -> NaN rows, never a wrong attention
    q, k, v = _qkv(batch=3)
    out = attention(q, k, v, MaskSpec(causal=True, key_mask=jnp.asarray(key_mask)), "cudnn")
    (call,) = cudnn_calls
    assert call["mask"] is None and call["bias"] is None
    assert call["is_causal"] is True and call["implementation"] == "cudnn"
    np.testing.assert_array_equal(np.asarray(call["query_seq_lengths"]), [12, 9, 10])
    np.testing.assert_array_equal(np.asarray(call["key_value_seq_lengths"]), [12, 9, 10])
    assert call["query_seq_lengths"].dtype == jnp.int32
    out = np.asarray(out)
    assert np.all(out[:2] == 0) and np.all(np.isnan(out[2]))


def test_a_row_without_valid_tokens_is_zeros_as_on_xla(monkeypatch):
    """cuDNN's softmax over zero keys is undefined (stood in for by NaN here): such a row (a CE-only
    row's empty pair, a padding row) comes back as zeros, what the xla path gives, not NaN."""
    given = []

    def fake(query, *a, **k):
        given.append(np.asarray(k["key_value_seq_lengths"]))
        return jnp.full(query.shape, jnp.nan, query.dtype)

    monkeypatch.setattr(jax.nn, "dot_product_attention", fake)
    key_mask = np.ones((2, 12), bool)
    key_mask[1] = False
    q, k, v = _qkv()
    spec = MaskSpec(causal=True, key_mask=jnp.asarray(key_mask))
    out = np.asarray(attention(q, k, v, spec, "cudnn"))
    np.testing.assert_array_equal(given[0], [12, 1])   # cuDNN never sees a zero length (backward)
    assert np.all(out[1] == 0) and np.all(np.isnan(out[0]))
    monkeypatch.undo()
    np.testing.assert_array_equal(np.asarray(attention(q, k, v, spec, "xla"))[1], 0)


def test_no_padding_no_lengths(cudnn_calls):
    q, k, v = _qkv()
    attention(q, k, v, MaskSpec(causal=False), "cudnn")
    (call,) = cudnn_calls
    assert call["is_causal"] is False and call["query_seq_lengths"] is None and call["mask"] is None


def test_qwen2_forward_on_cudnn_builds_no_dense_mask(cudnn_calls):
    """The whole LLM forward with attention_impl=cudnn: every layer's call gets lengths, no [T, T]."""
    config = Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=4, attention_impl="cudnn", scan_layers=False)
    ids = jnp.ones((2, 10), jnp.int32)
    mask = jnp.asarray(np.arange(10)[None] < np.array([[10], [6]]))
    model = Qwen2(config)
    params = model.init(jax.random.PRNGKey(0), ids)["params"]
    cudnn_calls.clear()
    model.apply({"params": params}, ids, attention_mask=mask)
    assert len(cudnn_calls) == 2  # one per layer
    for call in cudnn_calls:
        assert call["mask"] is None and call["bias"] is None and call["is_causal"] is True
        np.testing.assert_array_equal(np.asarray(call["key_value_seq_lengths"]), [10, 6])


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU (cuDNN fused attention)")
def test_cudnn_equals_xla_and_gradient_memory_is_linear():
    q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(length=256, heads=8, kv_heads=2, dim=64))
    key_mask = jnp.asarray(np.arange(256)[None] < np.array([[256], [200]]))
    spec = MaskSpec(causal=True, key_mask=key_mask)
    weight = key_mask[:, :, None, None].astype(jnp.float32)

    def run(impl):
        loss = lambda q, k, v: jnp.sum(weight * attention(q, k, v, spec, impl).astype(jnp.float32) ** 2)  # noqa: E731
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)

    (loss_c, grads_c), (loss_x, grads_x) = run("cudnn"), run("xla")
    np.testing.assert_allclose(float(loss_c), float(loss_x), rtol=2e-2)
    for a, b in zip(grads_c, grads_x):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=5e-2)

    def temp(length):  # 7B widths, AOT compile only
        q = jax.ShapeDtypeStruct((1, length, 28, 128), jnp.bfloat16)
        kv = jax.ShapeDtypeStruct((1, length, 4, 128), jnp.bfloat16)
        mask = jax.ShapeDtypeStruct((1, length), jnp.bool_)
        loss = lambda q, k, v, m: jnp.sum(attention(q, k, v, MaskSpec(True, m), "cudnn").astype(jnp.float32))  # noqa: E731
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv, mask).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    assert temp(16384) / temp(4096) <= 4.5
