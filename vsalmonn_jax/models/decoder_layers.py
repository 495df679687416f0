"""Building blocks of the LLM decoder: a LoRA-aware Dense with logical axes, RMSNorm, causal attention.

`Dense` looks for `lora/{a,b}` in its own scope, so adapting a projection is a matter of the LoRA
tree containing its path (see vsalmonn_jax/lora.py); no LoRA tree, no LoRA.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

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
            h = x
            if self.lora_dropout > 0.0 and not self.deterministic:
                h = nn.Dropout(self.lora_dropout)(h, deterministic=False)
            y = y + self.lora_scale * jnp.dot(jnp.dot(h.astype(self.dtype), a.astype(self.dtype)),
                                              b.astype(self.dtype))
        return y


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


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
                     implementation: str | None = None) -> jax.Array:
    """Multi-head attention with GQA. q [B,T,N,D], k/v [B,S,K,D] (N % K == 0), mask [B,1|N,T,S] bool.

    `implementation`: "xla" (any device) or "cudnn" (GPU fused attention). Softmax runs in fp32.
    """
    impl = None if implementation in (None, "xla") else implementation
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl)
