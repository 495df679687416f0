"""The Qwen2 decoder (the LLM of video-SALMONN 2) in Flax linen, with LoRA hooks and a KV cache.

RMSNorm, RoPE (theta), GQA with q/k/v biases, SwiGLU, untied lm_head; layers under `nn.scan` (one
compiled body for any depth) with optional remat. Weight import/export lives in `qwen2_hf.py`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from vsalmonn_jax.lora import LoraConfig
from vsalmonn_jax.models import kv_cache
from vsalmonn_jax.models.attention import (
    MaskSpec,
    attention,
    balanced_layout,
    check_impl_name,
    context_size,
    natural_layout,
    padded_length,
)
from vsalmonn_jax.models.decoder_layers import Dense, RMSNorm
from vsalmonn_jax.models.kv_cache import init_cache  # noqa: F401  (re-exported: the cache of this model)
from vsalmonn_jax.models.shards import constrain

# Activations tagged with `checkpoint_name` in a decoder layer (what the *_names policies can keep):
# attention_out = the attention's output before o_proj [B,T,N*D]; mlp_in = the normed MLP input [B,T,H].
REMAT_NAMES = ("attention_out", "mlp_in")
REMAT_POLICIES = {  # policy name -> (names to keep) -> jax checkpoint policy
    "full": lambda names: None,  # save nothing, recompute the whole layer in the backward pass
    "dots": lambda names: jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_all": lambda names: jax.checkpoint_policies.dots_saveable,
    "save_names": lambda names: jax.checkpoint_policies.save_only_these_names(*names),
    "offload_names": lambda names: jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=list(names),
        offload_src="device", offload_dst="pinned_host"),  # kept in host memory until the backward
}


@dataclasses.dataclass(frozen=True)
class Qwen2Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat_policy: str = "none"
    remat_names: tuple[str, ...] = REMAT_NAMES  # what save_names / offload_names keep
    attention_impl: str = "auto"  # auto | xla | splash | cudnn (models/attention)
    attention_block: int = 512    # query/key block of the xla and splash kernels
    attention_interpret: bool = False  # splash in Pallas interpret mode (CPU tests only)

    def __post_init__(self):
        check_impl_name(self.attention_impl)

    @classmethod
    def from_config(cls, cfg: Mapping) -> Qwen2Config:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in dict(cfg).items() if k in names})

    def replace(self, **kw) -> Qwen2Config:
        return dataclasses.replace(self, **kw)


def rope_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos/sin for rotate-half RoPE. positions [B,T] -> cos, sin [B,T,1,D] (fp32)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B,T,D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B,T,H,D]; rotate_half as in transformers (halves, not interleaved pairs)."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x.astype(jnp.float32) * cos + rotated * sin).astype(x.dtype)


class _Part(nn.Module):
    """Fields every part of a decoder layer shares: shapes, LoRA settings, dropout on/off."""

    config: Qwen2Config
    lora: LoraConfig | None = None
    deterministic: bool = True


class Attention(_Part):

    @nn.compact
    def __call__(self, x, cos, sin, mask, cache_index, kv, layer):
        """Without a cache (kv None): mask is a MaskSpec (models/attention: causal, padding, segments,
        shared-prefix branches). With one (kv = the carried k/v buffers [L,B,K,S,D], written in place
        at this `layer`): a prompt (T > 1, empty cache) takes a causal MaskSpec and the same kernel on
        its own K/V; a decode step (T = 1) takes the valid-slot mask [B,T,S]."""
        cfg = self.config
        dense = _dense_factory(cfg, self.lora, self.deterministic)
        batch, length, _ = x.shape
        q = dense(cfg.num_heads * cfg.head_dim, ("embed", "heads"), True, "q_proj")(x)
        k = dense(cfg.num_kv_heads * cfg.head_dim, ("embed", "kv_heads"), True, "k_proj")(x)
        v = dense(cfg.num_kv_heads * cfg.head_dim, ("embed", "kv_heads"), True, "v_proj")(x)
        q = q.reshape(batch, length, cfg.num_heads, cfg.head_dim)       # [B,T,N,D]
        k = k.reshape(batch, length, cfg.num_kv_heads, cfg.head_dim)    # [B,T,K,D]
        v = v.reshape(batch, length, cfg.num_kv_heads, cfg.head_dim)
        q = constrain(apply_rope(q, cos, sin), ("batch", "length", "activation_heads", "head_dim"))
        k = apply_rope(k, cos, sin)
        if kv is not None:   # write the T new keys/values at slots [index, index + T), in place
            new = (k, v)
            if isinstance(mask, MaskSpec) and mask.context > 1:   # a prompt split over context: the
                slots = kv[0].shape[kv_cache.SLOT_AXIS]          # cache keeps the natural order
                new = tuple(natural_layout(x, mask.context)[:, :slots] for x in new)
            kv = tuple(kv_cache.write(buf, x, layer, cache_index) for buf, x in zip(kv, new, strict=True))
        if kv is not None and length == 1:   # decode step: attend over this layer's cache
            k_layer, v_layer = (kv_cache.layer_slice(buf, layer) for buf in kv)   # [B,K,S,D]
            out = kv_cache.decode_attention(q, k_layer.astype(q.dtype), v_layer.astype(q.dtype), mask,
                                            cache_index + length, cfg.attention_block)
        else:                # no cache, or a prompt filling an empty one: causal over its own K/V
            k = constrain(k, ("batch", "kv_length", "activation_kv_heads", "head_dim"))
            v = constrain(v, ("batch", "kv_length", "activation_kv_heads", "head_dim"))
            out = attention(q, k, v, mask, cfg.attention_impl, cfg.attention_block,
                            cfg.attention_interpret)                     # [B,T,N,D]
        out = out.reshape(batch, length, cfg.num_heads * cfg.head_dim)
        out = checkpoint_name(out, "attention_out")
        out = dense(cfg.hidden_size, ("heads", "embed"), False, "o_proj")(out)
        return out, kv


class MLP(_Part):

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dense = _dense_factory(cfg, self.lora, self.deterministic)
        gate = dense(cfg.intermediate_size, ("embed", "mlp"), False, "gate_proj")(x)
        up = dense(cfg.intermediate_size, ("embed", "mlp"), False, "up_proj")(x)
        h = constrain(nn.silu(gate) * up, ("batch", "length", "activation_mlp"))
        return dense(cfg.hidden_size, ("mlp", "embed"), False, "down_proj")(h)


class DecoderLayer(_Part):
    """Pre-norm block. Fits nn.scan: (carry=(hidden, kv), *broadcast, layer index) -> (carry, None); the
    KV cache buffers kv [L,B,K,S,D] (or None) ride in the carry so each layer updates them in place."""

    @nn.compact
    def __call__(self, carry, cos, sin, mask, cache_index, layer):
        hidden, kv = carry
        cfg = self.config
        norm = lambda name: RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, name=name)
        attn_out, kv = Attention(cfg, self.lora, self.deterministic, name="self_attn")(
            norm("input_layernorm")(hidden), cos, sin, mask, cache_index, kv, layer)
        hidden = hidden + attn_out
        mlp_in = checkpoint_name(norm("post_attention_layernorm")(hidden), "mlp_in")
        hidden = hidden + MLP(cfg, self.lora, self.deterministic, name="mlp")(mlp_in)
        hidden = constrain(hidden, ("batch", "length", "activation_embed"))
        return (hidden, kv), None


def _dense_factory(cfg: Qwen2Config, lora: LoraConfig | None, deterministic: bool):
    def make(features, axes, use_bias, name):
        return Dense(features, axes, use_bias, cfg.dtype, cfg.param_dtype,
                     lora_scale=lora.scale if lora else 0.0,
                     lora_dropout=lora.dropout if lora else 0.0,
                     deterministic=deterministic, name=name)
    return make


def _logits(hidden: jax.Array, kernel: jax.Array, dtype) -> jax.Array:
    """[B,T,H] @ [H,V] -> [B,T,V], accumulated and returned in fp32."""
    logits = jnp.dot(hidden.astype(dtype), kernel.astype(dtype), preferred_element_type=jnp.float32)
    return constrain(logits, ("batch", "length", "activation_vocab"))


def _balanced(parts: int, *arrays):
    """[B,T,...] arrays (None passes) padded to context.padded_length (padding keys masked: the key
    mask is padded with False) and put in the balanced layout over `parts` context shards."""
    length = next(x for x in arrays if x is not None).shape[1]
    pad = padded_length(length, parts) - length
    return tuple(None if x is None else balanced_layout(
        jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)), parts) for x in arrays)


def default_positions(attention_mask: jax.Array) -> jax.Array:
    """Positions that skip padding: cumsum(mask) - 1, clipped at 0 (left or right padding). [B,T]"""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def branch_positions(attention_mask: jax.Array, branch_ids: jax.Array) -> jax.Array:
    """Positions of a packed row [prefix (branch 0) | continuation 1 | 2 | ...] (contiguous branches):
    the prefix counts 0, 1, ...; every continuation continues from the prefix's length, as if it
    followed the prefix alone. [B,T] -> [B,T]"""
    valid = attention_mask.astype(jnp.int32)
    count = jnp.cumsum(valid, axis=-1)                                   # valid tokens up to t
    previous = jnp.concatenate([branch_ids[:, :1] - 1, branch_ids[:, :-1]], axis=1)
    opens = branch_ids != previous                                       # a branch starts at t
    base = jax.lax.cummax(jnp.where(opens, count - valid, 0), axis=1)    # count before its start
    prefix = jnp.sum(valid * (branch_ids == 0), axis=-1, keepdims=True)  # [B,1]
    own = count - base                                                   # its own tokens up to t
    return jnp.maximum(jnp.where(branch_ids == 0, own, prefix + own) - 1, 0)


class Qwen2(nn.Module):
    """Qwen2ForCausalLM. Call with token ids or `inputs_embeds` (media spliced in by the AV model)."""

    config: Qwen2Config
    lora: LoraConfig | None = None

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """[B,T] int -> [B,T,H] (apply with method="embed" on existing variables)."""
        table = nn.unbox(self.variables["params"]["embed_tokens"]["embedding"])
        return jnp.take(table, input_ids, axis=0).astype(self.config.dtype)

    def lm_logits(self, hidden: jax.Array) -> jax.Array:
        """[B,T,H] final-norm hidden -> [B,T,V] fp32 logits (apply with method="lm_logits")."""
        params = self.variables["params"]
        kernel = (params["embed_tokens"]["embedding"].T if self.config.tie_word_embeddings
                  else params["lm_head"]["kernel"])
        return _logits(hidden, nn.unbox(kernel), self.config.dtype)

    @nn.compact
    def __call__(self, input_ids=None, *, inputs_embeds=None, attention_mask=None, positions=None,
                 cache=None, deterministic: bool = True, return_hidden: bool = False,
                 segment_ids=None, branch_ids=None):
        """segment_ids / branch_ids [B,T] (no cache): packed sequences / continuations sharing a
        prefix (models/attention/mask.py); the caller then passes `positions` too."""
        cfg = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        packed = segment_ids is not None or branch_ids is not None
        if packed and (cache is not None or positions is None):
            raise ValueError("segment_ids / branch_ids need explicit `positions` (each packed sequence "
                             "or continuation numbers its own tokens) and no KV cache")
        embed_tokens = nn.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
            name="embed_tokens")
        hidden = embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds.astype(cfg.dtype)
        batch, length = hidden.shape[:2]
        if attention_mask is None:
            attention_mask = jnp.ones((batch, length), bool)
        attention_mask = attention_mask.astype(bool)
        mask, cache_index, cache_mask = self._mask(attention_mask, cache, length, segment_ids, branch_ids)
        if positions is None and cache is None:
            positions = default_positions(attention_mask)
        elif positions is None:
            positions = jax.lax.dynamic_slice_in_dim(default_positions(cache_mask), cache_index, length, 1)
        parts = context_size() if isinstance(mask, MaskSpec) else 1   # decode: replicated over context
        if parts > 1:   # the sequence split over `context`, load-balanced (models/attention/context.py)
            hidden, positions, *ids = _balanced(parts, hidden, positions, mask.key_mask, mask.segment_ids,
                                                mask.branch_ids)
            mask = MaskSpec(causal=True, key_mask=ids[0], segment_ids=ids[1], branch_ids=ids[2],
                            context=parts)
        cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta)
        hidden = constrain(hidden, ("batch", "length", "activation_embed"))
        hidden, new_kv = self._layers(hidden, cos, sin, mask, cache_index, cache, deterministic)
        if parts > 1:   # back to the natural order: logits / log-probs stay split over context
            hidden = natural_layout(hidden, parts)[:, :length]
            hidden = constrain(hidden, ("batch", "length", "activation_embed"))
        hidden = RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, name="norm")(hidden)
        new_cache = None
        if cache is not None:
            new_cache = {"k": new_kv[0], "v": new_kv[1], "mask": cache_mask,
                         "index": cache["index"] + length}
        if return_hidden:
            return hidden, new_cache
        if cfg.tie_word_embeddings:
            logits = _logits(hidden, embed_tokens.embedding.T, cfg.dtype)
        else:
            logits = Dense(cfg.vocab_size, ("embed", "vocab"), False, cfg.dtype, cfg.param_dtype,
                           accumulate_fp32=True, name="lm_head")(hidden)
        return constrain(logits, ("batch", "length", "activation_vocab")), new_cache

    def _mask(self, attention_mask, cache, length, segment_ids=None, branch_ids=None):
        """A MaskSpec (the attention kernels never see a [T,T] mask) without a cache or for a prompt
        filling an empty one; for a decode step (T = 1) the valid-slot mask [B,T,S]."""
        if cache is None:
            spec = MaskSpec(causal=True, key_mask=attention_mask, segment_ids=segment_ids, branch_ids=branch_ids)
            return spec, jnp.zeros((), jnp.int32), None
        index = cache["index"]
        if length > 1 and not isinstance(index, jax.core.Tracer) and int(index) != 0:
            raise ValueError(f"a {length}-token input with a KV cache is a prompt and needs an empty "
                             f"cache (index 0, from init_cache), got index {int(index)}; feed later "
                             "tokens one at a time")
        cache_mask = jax.lax.dynamic_update_slice_in_dim(cache["mask"], attention_mask, index, axis=1)
        if length > 1:
            return MaskSpec(causal=True, key_mask=attention_mask), index, cache_mask
        return kv_cache.slot_mask(cache_mask, index, length), index, cache_mask

    def _layers(self, hidden, cos, sin, mask, cache_index, cache, deterministic):
        cfg = self.config
        block = DecoderLayer
        if cfg.remat_policy != "none":
            block = nn.remat(block, policy=remat_policy(cfg), prevent_cse=not cfg.scan_layers)
        carry = (hidden, (cache["k"], cache["v"]) if cache is not None else None)
        if cfg.scan_layers:
            scanned = nn.scan(
                block, variable_axes={"params": 0, "lora": 0}, split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0), length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"})
            layers = jnp.arange(cfg.num_layers, dtype=jnp.int32)
            carry, _ = scanned(cfg, self.lora, deterministic, name="layers")(
                carry, cos, sin, mask, cache_index, layers)
            return carry
        for i in range(cfg.num_layers):
            carry, _ = block(cfg, self.lora, deterministic, name=f"layers_{i}")(
                carry, cos, sin, mask, cache_index, i)
        return carry


def remat_policy(cfg: Qwen2Config):
    """The jax checkpoint policy of `cfg.remat_policy` (names checked: a typo would save nothing)."""
    if cfg.remat_policy not in REMAT_POLICIES:
        raise ValueError(f"model.llm.remat_policy={cfg.remat_policy!r}: expected none or one of "
                         f"{sorted(REMAT_POLICIES)}")
    unknown = sorted(set(cfg.remat_names) - set(REMAT_NAMES))
    if unknown:
        raise ValueError(f"model.llm.remat_names has {unknown}: the decoder layer tags only "
                         f"{list(REMAT_NAMES)}")
    return REMAT_POLICIES[cfg.remat_policy](tuple(cfg.remat_names))


def load_hf(path, config: Qwen2Config | None = None, **kwargs):
    """Import a `transformers` Qwen2 checkpoint directory -> (params, Qwen2Config). See qwen2_hf."""
    from vsalmonn_jax.models import qwen2_hf
    return qwen2_hf.load_hf(path, config, **kwargs)


def save_hf(params, config: Qwen2Config, path, **kwargs) -> None:
    """Export params as a `transformers` Qwen2ForCausalLM directory (safetensors + config.json)."""
    from vsalmonn_jax.models import qwen2_hf
    qwen2_hf.save_hf(params, config, path, **kwargs)
