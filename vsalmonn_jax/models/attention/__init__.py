"""The attention room: `attention(q, k, v, mask_spec, impl, block)` dispatches to one backend file.

Backends: xla (blockwise flash kernel, any device), splash (TPU Pallas), cudnn (GPU fused); `auto`
picks splash on TPU, cudnn on GPU, xla on CPU, and xla wherever the mask needs more than the
platform's backend expresses (packed DPO rows). What each backend can express is in SUPPORTED.
A MaskSpec with context > 1 (tokens in balanced layout over the mesh's `context` axis) runs
context.py: the xla kernel per shard with all-gathered K/V, whatever the backend.
"""

from __future__ import annotations

import jax

from vsalmonn_jax.models.attention.context import context_attention, context_size, padded_length
from vsalmonn_jax.models.attention.cudnn import cudnn_attention
from vsalmonn_jax.models.attention.mask import (
    KINDS,
    MaskSpec,
    balanced_layout,
    causal_padding,
    natural_layout,
)
from vsalmonn_jax.models.attention.reference import reference_attention
from vsalmonn_jax.models.attention.splash import splash_attention
from vsalmonn_jax.models.attention.xla import xla_attention

__all__ = ["IMPLS", "KINDS", "SUPPORTED", "MaskSpec", "attention", "balanced_layout", "causal_padding",
           "check_impl_name", "check_supported", "context_size", "natural_layout", "padded_length",
           "reference_attention", "resolve_impl", "xla_attention"]

IMPLS = ("auto", "xla", "splash", "cudnn")
SUPPORTED = {  # mask kinds (beyond causal / bidirectional) each backend expresses without O(T^2)
    "xla": frozenset(KINDS),
    "splash": frozenset({"padding", "segments"}),
    "cudnn": frozenset({"padding"}),
}
# cuDNN's fused attention exists on NVIDIA GPUs only: AMD (rocm) takes the blockwise XLA kernel
PLATFORM_DEFAULT = {"tpu": "splash", "gpu": "cudnn", "cuda": "cudnn", "rocm": "xla"}


def check_impl_name(impl: str) -> str:
    """Config-time check of an attention_impl name (touches no device: safe before jax.distributed)."""
    if impl == "jax":
        raise ValueError("attention_impl 'jax' was removed (it built a dense [T, T] mask); "
                         "use 'xla' (blockwise, any device) or 'auto'")
    if impl not in IMPLS:
        raise ValueError(f"attention_impl must be one of {', '.join(IMPLS)}; got {impl!r}")
    return impl


def resolve_impl(impl: str, platform: str | None = None) -> str:
    """`auto` -> the backend of `platform` (default: jax's default backend); others are checked."""
    if check_impl_name(impl) != "auto":
        return impl
    return PLATFORM_DEFAULT.get(platform or _default_platform(), "xla")


def _default_platform() -> str:
    """jax's default backend, with "gpu" told apart: "rocm" on AMD (jax names both "gpu")."""
    backend = jax.default_backend()
    if backend == "gpu" and "rocm" in str(jax.devices()[0].client.platform_version).lower():
        return "rocm"
    return backend


def check_supported(impl: str, kinds) -> str:
    """Raise (naming the backend, the kinds and the fix) unless `impl` expresses every mask kind in
    `kinds`; returns the resolved backend. Call it at config time where the kinds are known (e.g. a
    packed-DPO stage needs {"prefix"}); `attention` calls it again while tracing. `auto` falls back
    to xla (every kind) where the platform's backend lacks one."""
    resolved = resolve_impl(impl)
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown mask kinds {sorted(unknown)}; known: {', '.join(KINDS)}")
    missing = set(kinds) - SUPPORTED[resolved]
    if missing and impl == "auto":  # e.g. packed DPO rows on GPU / TPU: the blockwise xla kernel
        return "xla"
    if missing:
        able = [name for name, ok in SUPPORTED.items() if set(kinds) <= ok]
        raise ValueError(f"attention_impl {impl!r} ({resolved}) cannot express the {sorted(missing)} "
                         f"mask without a dense O(T^2) mask; set model.llm.attention_impl to one of {able}")
    return resolved


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask_spec: MaskSpec, impl: str = "auto",
              block: int = 512, interpret: bool = False, scale: float | None = None) -> jax.Array:
    """q [B,T,N,D], k/v [B,T,K,D] (GQA: N % K == 0, K/V never repeated) -> [B,T,N,D].

    `block`: query/key block of xla and splash (static; memory is O(T * block)). `interpret`: run
    splash's Pallas kernel in interpret mode (CPU tests only). `scale` defaults to D**-0.5.
    """
    backend = check_supported(impl, mask_spec.kinds())
    if mask_spec.context > 1:
        return context_attention(q, k, v, mask_spec, block, scale)
    if backend == "splash":
        return splash_attention(q, k, v, mask_spec, block, scale, interpret)
    if backend == "cudnn":
        return cudnn_attention(q, k, v, mask_spec, scale)
    return xla_attention(q, k, v, mask_spec, block, scale)
