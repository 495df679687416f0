"""Building blocks of the LLM decoder: a LoRA-aware Dense with logical axes, RMSNorm, attention entry points.

`Dense` looks for `lora/{a,b}` in its own scope, so adapting a projection is a matter of the LoRA
tree containing its path (see vsalmonn_jax/lora.py); no LoRA tree, no LoRA.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vsalmonn_jax.models.attention import causal_padding, xla_attention

Dtype = Any
default_kernel_init = nn.initializers.normal(stddev=0.02)


class Dense(nn.Module):
    """`y = x @ kernel (+ bias) (+ scale * dropout(x) @ lora_a @ lora_b)`; kernel `[in, out]`."""

    features: int
    kernel_axes: tuple[str | None, str | None]
    use_bias: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    lora_scale: float = 0.0
    lora_dropout: float = 0.0
    deterministic: bool = True
    accumulate_fp32: bool = False  # fp32 output (logits) whatever the compute dtype
    kernel_init: Any = default_kernel_init

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, self.kernel_axes),
                            (x.shape[-1], self.features), self.param_dtype)
        y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype),
                    preferred_element_type=jnp.float32 if self.accumulate_fp32 else None)
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.kernel_axes[1:]),
                              (self.features,), self.param_dtype)
            y = y + bias.astype(y.dtype)
        if self.has_variable("lora", "a"):
            a = self.get_variable("lora", "a")  # [in, rank]
            b = self.get_variable("lora", "b")  # [rank, out]
            if self.lora_dropout > 0.0 and not self.deterministic:
                h = LoraDropoutA(self.lora_dropout, self.dtype, name="Dropout_0")(x, a)   # [..., rank]
            else:
                h = jnp.dot(x.astype(self.dtype), a.astype(self.dtype))
            y = y + self.lora_scale * jnp.dot(h, b.astype(self.dtype))
        return y


def _after(key: jax.Array, t: jax.Array) -> jax.Array:
    """`key`, usable only once `t` exists: the mask is drawn where it is used, neither hoisted to the
    start by the scheduler nor merged by CSE with the forward's draw. An optimization barrier does it
    on GPU/TPU; CPU XLA expands barriers before scheduling, so there the key is tied to one element
    of `t` (unchanged unless that element is NaN; on GPU/TPU this would cost a cross-device read)."""
    if jax.default_backend() != "cpu":
        return jax.lax.optimization_barrier((key, t))[0]
    flag = jnp.isnan(t.reshape(-1)[0]).astype(jnp.uint32)
    return jax.random.wrap_key_data(jax.random.key_data(key) ^ flag, impl=jax.random.key_impl(key))


def _dropped(x: jax.Array, key: jax.Array, keep: float) -> jax.Array:
    """nn.Dropout's formula: keep with probability `keep`, kept values divided by it."""
    mask = jax.random.bernoulli(key, p=keep, shape=x.shape)
    return jax.lax.select(mask, x / keep, jnp.zeros_like(x))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def dropout_dot(x: jax.Array, a: jax.Array, key: jax.Array, rate: float, dtype) -> jax.Array:
    """`dropout(x) @ a` ([..., in] @ [in, rank]) whose backward regenerates the dropout mask from
    `key`: only x, a and the key are kept from the forward, no mask of x's size."""
    if rate >= 1.0:
        return jnp.zeros((*x.shape[:-1], a.shape[-1]), dtype)
    return jnp.dot(_dropped(x, _after(key, x), 1.0 - rate).astype(dtype), a.astype(dtype))


def _dropout_dot_fwd(x, a, key, rate, dtype):
    return dropout_dot(x, a, key, rate, dtype), (x, a, key)


def _dropout_dot_bwd(rate, dtype, residuals, g):
    x, a, key = residuals
    if rate >= 1.0:
        return jnp.zeros_like(x), jnp.zeros_like(a), None
    keep = 1.0 - rate   # the mask is drawn again here, once the cotangent exists
    h, grad_h = jax.vjp(lambda x: _dropped(x, _after(_after(key, x), g), keep).astype(dtype), x)
    flat_h = h.reshape(-1, h.shape[-1])                                  # [N, in]
    flat_g = g.reshape(-1, g.shape[-1])                                  # [N, rank]
    da = jnp.dot(flat_h.T, flat_g.astype(dtype)).astype(a.dtype)        # [in, rank]
    dx, = grad_h(jnp.dot(g.astype(dtype), a.astype(dtype).T))            # [..., in]
    return dx, da, None


dropout_dot.defvjp(_dropout_dot_fwd, _dropout_dot_bwd)


class LoraDropoutA(nn.Module):
    """LoRA's `dropout(x) @ a` with a recomputed mask. Named "Dropout_0" by Dense so its key is the
    one the former `nn.Dropout` child drew: the same rng gives the same masks as before."""

    rate: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, a: jax.Array) -> jax.Array:
        return dropout_dot(x, a, self.make_rng("dropout"), self.rate, self.dtype)


class RMSNorm(nn.Module):
    """Qwen2/Llama RMSNorm: statistics in fp32, weight applied after casting back."""

    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * x32.astype(self.dtype)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array,
                     block: int = 512) -> jax.Array:
    """Causal self-attention over one sequence (no cache): the blockwise `xla` kernel of
    models/attention (O(T) memory forward and backward). q [B,T,N,D], k/v [B,T,K,D] (GQA: N % K == 0),
    key_mask [B,T] bool -> [B,T,N,D]."""
    return xla_attention(q, k, v, causal_padding(key_mask), block)

