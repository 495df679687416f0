"""Linen building blocks for the media encoders and connectors (siglip, whisper, qformer, connectors).

Every parameter carries logical axis names and lives in a chosen variable collection (`params` for
frozen encoders, `adapter` for trainable connectors), so one Dense serves both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Initializer = Callable[..., jax.Array]

ADAPTER = "adapter"  # the trainable-connector collection (design decision 1)


def declare(module: nn.Module, collection: str, name: str, init: Initializer, shape: Sequence[int],
            dtype: Dtype, axes: Sequence[str | None]) -> jax.Array:
    """A parameter of `module` in `collection`, annotated with logical `axes` (unboxed value)."""
    boxed_init = nn.with_logical_partitioning(init, tuple(axes))
    if collection == "params":
        return module.param(name, boxed_init, tuple(shape), dtype)
    variable = module.variable(
        collection, name, lambda: boxed_init(module.make_rng("params"), tuple(shape), dtype))
    return variable.value


class Dense(nn.Module):
    """x @ kernel [in, out] (+ bias [out]); kernel/bias in `collection` with logical `axes`."""

    features: int
    axes: tuple[str | None, str | None]
    use_bias: bool = True
    collection: str = "params"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer = nn.initializers.normal(0.02)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = declare(self, self.collection, "kernel", self.kernel_init,
                         (x.shape[-1], self.features), self.param_dtype, self.axes)
        y = jnp.matmul(x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bias = declare(self, self.collection, "bias", nn.initializers.zeros, (self.features,),
                           self.param_dtype, self.axes[1:])
            y = y + bias.astype(self.dtype)
        return y


class LayerNorm(nn.Module):
    """LayerNorm over the last axis, statistics in fp32; scale/bias in `collection`."""

    eps: float = 1e-5
    axis_name: str | None = "norm"
    collection: str = "params"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        scale = declare(self, self.collection, "scale", nn.initializers.ones, (features,),
                        self.param_dtype, (self.axis_name,))
        bias = declare(self, self.collection, "bias", nn.initializers.zeros, (features,),
                       self.param_dtype, (self.axis_name,))
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.astype(self.dtype)


def gelu(x: jax.Array, approximate: bool) -> jax.Array:
    """GELU: exact erf form (torch nn.GELU / Whisper / BERT) or tanh form (SigLIP gelu_pytorch_tanh)."""
    return jax.nn.gelu(x, approximate=approximate)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None,
              impl: str = "xla", probs_dropout: Callable[[jax.Array], jax.Array] | None = None
              ) -> jax.Array:
    """Bidirectional multi-head attention, softmax in fp32.

    q [B, T, N, D], k/v [B, S, N, D], mask bool [B, S] (True = attend) or None -> [B, T, N, D].
    impl "xla": plain einsum + softmax (any device); "cudnn": jax.nn.dot_product_attention's fused
    GPU kernel (bf16/fp16 inputs). `probs_dropout` (xla only) is applied to the attention
    probabilities (BERT's attention dropout).
    """
    if impl == "cudnn":
        if probs_dropout is not None:
            raise ValueError("attention probs_dropout needs impl='xla'")
        full = None if mask is None else mask[:, None, None, :]
        return jax.nn.dot_product_attention(q, k, v, mask=full, implementation="cudnn")
    if impl != "xla":
        raise ValueError(f"attention impl must be 'xla' or 'cudnn', got {impl!r}")
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("btnd,bsnd->bnts", q, k).astype(jnp.float32) * scale  # [B, N, T, S]
    if mask is not None:
        logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)   # [B, N, T, S]
    if probs_dropout is not None:
        weights = probs_dropout(weights)
    return jnp.einsum("bnts,bsnd->btnd", weights, v)


def scan_layers(layer_cls: type[nn.Module], num_layers: int, remat: bool, name: str,
                **layer_kwargs) -> nn.Module:
    """`num_layers` copies of a (carry -> carry, None) layer under nn.scan, params stacked on a
    leading `layers` axis; per-layer nn.remat when `remat`."""
    cls = nn.remat(layer_cls, prevent_cse=False) if remat else layer_cls
    scanned = nn.scan(cls, variable_axes={"params": 0}, split_rngs={"params": True},
                      length=num_layers, metadata_params={nn.PARTITION_NAME: "layers"})
    return scanned(name=name, **layer_kwargs)


def scan_chunks(module: nn.Module, fn: Callable[[nn.Module, jax.Array], jax.Array], x: jax.Array,
                chunk: int) -> jax.Array:
    """Apply fn(module, x[i:i+chunk]) over the leading axis of x in chunks of `chunk` items under
    nn.scan (parameters broadcast), so only one chunk's activations are live at a time.

    x [N, ...] -> fn's outputs concatenated [N, ...]. Chunks are sliced out of x inside the loop (no
    padded copy of the input); a last partial chunk runs once more outside the loop.
    """
    n = x.shape[0]
    if chunk <= 0 or n <= chunk:
        return fn(module, x)
    full = n // chunk

    def body(mdl, carry, i):
        return carry, fn(mdl, jax.lax.dynamic_slice_in_dim(x, i * chunk, chunk, axis=0))

    scan = nn.scan(body, variable_broadcast="params", split_rngs={"params": False},
                   in_axes=0, out_axes=0)
    _, ys = scan(module, None, jnp.arange(full))  # [full, chunk, ...]
    out = ys.reshape(full * chunk, *ys.shape[2:])
    if n % chunk:
        out = jnp.concatenate([out, fn(module, x[full * chunk:])], axis=0)
    return out


def config_from_section(cls, section, **overrides):
    """Build the frozen dataclass `cls` from a config section (extra keys ignored) plus overrides."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in dict(section).items()
              if k in names}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**values)


class PreLNEncoderLayer(nn.Module):
    """The pre-LN transformer block of SigLIP and Whisper: x + attn(LN(x)); x + fc2(gelu(fc1(LN(x)))).

    nn.scan signature (carry, _) -> (carry, None); x [N, T, D]. The two towers differ only in the
    fields: norm names, whether k_proj has a bias, the GELU form and the logical axis names.
    """

    num_heads: int
    mlp_dim: int
    eps: float
    norm_names: tuple[str, str]
    embed_axis: str
    mlp_axis: str
    key_bias: bool = True
    gelu_tanh: bool = False
    attention_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, _=None):
        dense = lambda f, axes, name, bias=True: Dense(
            f, axes, use_bias=bias, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        norm = lambda name: LayerNorm(self.eps, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        n, t, d = x.shape
        heads, head_dim = self.num_heads, d // self.num_heads
        y = norm(self.norm_names[0])(x)
        q = dense(d, (self.embed_axis, "heads"), "q_proj")(y).reshape(n, t, heads, head_dim)
        k = dense(d, (self.embed_axis, "heads"), "k_proj", self.key_bias)(y).reshape(n, t, heads, head_dim)
        v = dense(d, (self.embed_axis, "heads"), "v_proj")(y).reshape(n, t, heads, head_dim)
        o = attention(q, k, v, impl=self.attention_impl).reshape(n, t, d)
        x = x + dense(d, ("heads", self.embed_axis), "out_proj")(o)
        y = norm(self.norm_names[1])(x)
        y = gelu(dense(self.mlp_dim, (self.embed_axis, self.mlp_axis), "fc1")(y), self.gelu_tanh)
        x = x + dense(d, (self.mlp_axis, self.embed_axis), "fc2")(y)
        return x, None
