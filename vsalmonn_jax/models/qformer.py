"""Window-level Q-Former audio connector (trainable, `adapter` collection) in Flax linen.

BLIP-2 style Q-Former (LayerNorm on the learned queries; per layer: BERT post-LN self-attention over
the queries, cross-attention to one window of Whisper frames, query feed-forward), applied to every
window of `window` encoder frames (25 = 0.5 s); then the audio projection to the LLM width,
`final_linear` (Linear-GELU-Linear) and the per-30-s-chunk sinusoidal position.
Dropout (`dropout`, BERT's hidden and attention-probability dropout; the release trains with 0.1)
is active only with deterministic=False (rng "dropout"): after the query LayerNorm, on the
attention probabilities, on each attention output and on the feed-forward output.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vsalmonn_jax.models.media_layers import (
    ADAPTER,
    Dense,
    LayerNorm,
    attention,
    config_from_section,
    declare,
    gelu,
)


@dataclasses.dataclass(frozen=True)
class QFormerConfig:
    hidden_size: int = 768
    num_layers: int = 2
    num_heads: int = 12
    intermediate_size: int = 3072
    layer_norm_eps: float = 1e-12
    window: int = 25              # Whisper frames per window (0.5 s at 50 Hz)
    num_queries: int = 1          # learned queries = audio tokens per window
    cross_attention_freq: int = 1  # cross-attention in layers with index % freq == 0
    encoder_width: int = 1280     # Whisper d_model (set from the audio section)
    llm_hidden: int = 3584        # output width (set from the llm section)
    use_final_linear: bool = True
    initializer_range: float = 0.02   # N(0, .) for every kernel and the queries (BERT / BLIP-2)
    dropout: float = 0.0          # hidden + attention-probability dropout in training (release 0.1)
    dtype: str = "float32"
    param_dtype: str = "float32"  # trainable: fp32

    @classmethod
    def from_config(cls, section, **overrides) -> QFormerConfig:
        return config_from_section(cls, section, **overrides)

    def windows_per_chunk(self, encoder_frames: int) -> int:
        """Windows cut from one chunk (unfold with kernel = stride = window; the remainder is dropped)."""
        return encoder_frames // self.window

    def tokens_per_chunk(self, encoder_frames: int) -> int:
        return self.windows_per_chunk(encoder_frames) * self.num_queries


def _init(cfg: QFormerConfig):
    return nn.initializers.normal(cfg.initializer_range)


class QFormerAttention(nn.Module):
    """BERT attention block: LayerNorm(x + dense(MHA(x, context)))."""

    config: QFormerConfig
    collection: str = ADAPTER

    @nn.compact
    def __call__(self, x, context, deterministic: bool = True):  # x [N, Q, H], context [N, S, E]
        cfg = self.config
        drop = nn.Dropout(cfg.dropout, deterministic=deterministic)
        h = cfg.hidden_size
        dense = lambda axes, name: Dense(h, axes, collection=self.collection, dtype=cfg.dtype,
                                         param_dtype=cfg.param_dtype, name=name,
                                         kernel_init=_init(cfg))
        n, nq, _ = x.shape
        heads, head_dim = cfg.num_heads, h // cfg.num_heads
        ctx_axis = "qformer_embed" if context is x else "audio_embed"
        q = dense(("qformer_embed", "qformer_mlp"), "query")(x).reshape(n, nq, heads, head_dim)
        k = dense((ctx_axis, "qformer_mlp"), "key")(context).reshape(n, -1, heads, head_dim)
        v = dense((ctx_axis, "qformer_mlp"), "value")(context).reshape(n, -1, heads, head_dim)
        o = attention(q, k, v, probs_dropout=drop).reshape(n, nq, h)
        o = drop(dense(("qformer_mlp", "qformer_embed"), "output")(o))
        return LayerNorm(cfg.layer_norm_eps, "qformer_embed", self.collection, cfg.dtype,
                         cfg.param_dtype, name="output_norm")(o + x)


class QFormerLayer(nn.Module):
    config: QFormerConfig
    cross_attention: bool
    collection: str = ADAPTER

    @nn.compact
    def __call__(self, x, encoder_states, deterministic: bool = True):
        cfg = self.config
        x = QFormerAttention(cfg, self.collection, name="self_attention")(x, x, deterministic)
        if self.cross_attention:
            x = QFormerAttention(cfg, self.collection, name="cross_attention")(
                x, encoder_states, deterministic)
        y = Dense(cfg.intermediate_size, ("qformer_embed", "qformer_mlp"), collection=self.collection,
                  dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="intermediate",
                  kernel_init=_init(cfg))(x)
        y = Dense(cfg.hidden_size, ("qformer_mlp", "qformer_embed"), collection=self.collection,
                  dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="output",
                  kernel_init=_init(cfg))(gelu(y, False))
        y = nn.Dropout(cfg.dropout, deterministic=deterministic)(y)
        return LayerNorm(cfg.layer_norm_eps, "qformer_embed", self.collection, cfg.dtype,
                         cfg.param_dtype, name="output_norm")(y + x)


class QFormer(nn.Module):
    """Blip2QFormerModel over query embeddings: [N, Q, H] x encoder states [N, S, E] -> [N, Q, H]."""

    config: QFormerConfig
    collection: str = ADAPTER

    @nn.compact
    def __call__(self, query_embeds, encoder_states, deterministic: bool = True):
        cfg = self.config
        x = LayerNorm(cfg.layer_norm_eps, "qformer_embed", self.collection, cfg.dtype,
                      cfg.param_dtype, name="layernorm")(query_embeds)
        x = nn.Dropout(cfg.dropout, deterministic=deterministic)(x)
        for i in range(cfg.num_layers):
            x = QFormerLayer(cfg, i % cfg.cross_attention_freq == 0, self.collection,
                             name=f"layers_{i}")(x, encoder_states, deterministic)
        return x


def chunk_positions(num_chunks: int, width: int) -> np.ndarray:
    """The official per-chunk position [num_chunks, width]: chunk 0 gets zeros, chunk c >= 1 gets
    sin((c-1) * w) in even and cos((c-1) * w) in odd channels, w = 10000^(-2j/width)."""
    position = np.arange(max(num_chunks - 1, 0), dtype=np.float32)[:, None]
    div = np.exp(np.arange(0, width, 2, dtype=np.float32) * -(np.log(np.float32(10000.0)) / width))
    table = np.zeros((num_chunks, width), np.float32)
    table[1:, 0::2] = np.sin(position * div)
    table[1:, 1::2] = np.cos(position * div)[:, : width // 2]
    return table


class AudioConnector(nn.Module):
    """Whisper features (after ln_speech) [B, C, T, E] -> audio tokens [B, C * (T // window) * Q, llm_hidden].

    Trainable parts (query, Q-Former, audio_proj, final_linear) live in `collection` (adapter).
    """

    config: QFormerConfig
    collection: str = ADAPTER

    @nn.compact
    def __call__(self, features: jax.Array, deterministic: bool = True) -> jax.Array:
        cfg = self.config
        b, c, t, e = features.shape
        windows = cfg.windows_per_chunk(t)
        if windows == 0:
            raise ValueError(f"audio features {features.shape}: fewer frames than one window ({cfg.window})")
        x = features[:, :, : windows * cfg.window].reshape(b * c * windows, cfg.window, e)  # [N, 25, E]
        query = declare(self, self.collection, "query", _init(cfg),
                        (cfg.num_queries, cfg.hidden_size), cfg.param_dtype, (None, "qformer_embed"))
        query = jnp.broadcast_to(query.astype(cfg.dtype), (x.shape[0], *query.shape))  # [N, Q, H]
        y = QFormer(cfg, self.collection, name="qformer")(query, x, deterministic)  # [N, Q, H]
        y = Dense(cfg.llm_hidden, ("qformer_embed", "embed"), collection=self.collection,
                  dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="audio_proj", kernel_init=_init(cfg))(y)
        if cfg.use_final_linear:
            y = Dense(cfg.llm_hidden, ("embed", "mlp"), collection=self.collection, dtype=cfg.dtype,
                      param_dtype=cfg.param_dtype, name="final_linear_0", kernel_init=_init(cfg))(y)
            y = Dense(cfg.llm_hidden, ("mlp", "embed"), collection=self.collection, dtype=cfg.dtype,
                      param_dtype=cfg.param_dtype, name="final_linear_1",
                      kernel_init=_init(cfg))(gelu(y, False))
        y = y.reshape(b, c, windows * cfg.num_queries, cfg.llm_hidden)
        y = y + jnp.asarray(chunk_positions(c, cfg.llm_hidden), y.dtype)[None, :, None, :]
        return y.reshape(b, c * windows * cfg.num_queries, cfg.llm_hidden)


def num_params(cfg: QFormerConfig) -> int:
    """Closed-form trainable parameter count of the AudioConnector."""
    h, i, e, d = cfg.hidden_size, cfg.intermediate_size, cfg.encoder_width, cfg.llm_hidden
    attn_self = 4 * (h * h + h) + 2 * h
    attn_cross = 2 * (h * h + h) + 2 * (e * h + h) + 2 * h
    ffn = h * i + i + i * h + h + 2 * h
    layers = sum(attn_self + ffn + (attn_cross if k % cfg.cross_attention_freq == 0 else 0)
                 for k in range(cfg.num_layers))
    head = h * d + d + (2 * (d * d + d) if cfg.use_final_linear else 0)
    return cfg.num_queries * h + 2 * h + layers + head
