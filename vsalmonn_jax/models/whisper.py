"""Whisper audio encoder (frozen) in Flax linen: conv stem, sinusoidal positions, pre-LN blocks, final LN.

Input: log-mel 30-s chunks [N, num_mel_bins, 3000] -> [N, 1500, d_model]; chunks run `chunk_batch`
at a time. `AudioEncoder` adds video-SALMONN 2's frozen `ln_speech` LayerNorm on top.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vsalmonn_jax.models.media_layers import (
    LayerNorm,
    PreLNEncoderLayer,
    config_from_section,
    declare,
    gelu,
    scan_chunks,
    scan_layers,
)


@dataclasses.dataclass(frozen=True)
class WhisperConfig:
    d_model: int
    num_layers: int
    num_heads: int
    ffn_dim: int
    num_mel_bins: int = 128
    max_source_positions: int = 1500   # encoder frames per 30-s chunk (mel frames / 2)
    chunk_batch: int = 4               # 30-s chunks per scan step (0 = all at once)
    chunk_seconds: int = 30
    layer_norm_eps: float = 1e-5
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False
    attention_impl: str = "xla"   # xla | cudnn (set from model.llm.attention_impl)

    @classmethod
    def from_config(cls, section, **overrides) -> WhisperConfig:
        return config_from_section(cls, section, **overrides)

    @property
    def mel_frames(self) -> int:
        return 2 * self.max_source_positions


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
    """Whisper's fixed position table [length, channels]: sin in the first half, cos in the second."""
    log_increment = np.log(max_timescale) / (channels // 2 - 1)
    inv = np.exp(-log_increment * np.arange(channels // 2, dtype=np.float64))
    scaled = np.arange(length, dtype=np.float64)[:, None] * inv[None, :]
    return np.concatenate([np.sin(scaled), np.cos(scaled)], axis=1).astype(np.float32)


class WhisperStem(nn.Module):
    """conv1 (k3, pad 1) - GELU - conv2 (k3, stride 2, pad 1) - GELU + positions: [N, M, 3000] -> [N, 1500, D]."""

    config: WhisperConfig

    @nn.compact
    def __call__(self, mel: jax.Array) -> jax.Array:
        cfg = self.config
        if mel.shape[1:] != (cfg.num_mel_bins, cfg.mel_frames):
            raise ValueError(f"mel {mel.shape}: expected [chunks, {cfg.num_mel_bins}, {cfg.mel_frames}] "
                             "(audio.num_mel_bins, 30-s chunks padded to 3000 frames)")
        x = jnp.swapaxes(mel.astype(cfg.dtype), 1, 2)  # [N, 3000, M]
        for name, stride, c_in in (("conv1", 1, cfg.num_mel_bins), ("conv2", 2, cfg.d_model)):
            kernel = declare(self, "params", f"{name}_kernel", nn.initializers.lecun_normal(),
                             (3, c_in, cfg.d_model), cfg.param_dtype,
                             (None, "conv_in", "audio_embed"))
            bias = declare(self, "params", f"{name}_bias", nn.initializers.zeros, (cfg.d_model,),
                           cfg.param_dtype, ("audio_embed",))
            x = jax.lax.conv_general_dilated(
                x, kernel.astype(cfg.dtype), window_strides=(stride,), padding=[(1, 1)],
                dimension_numbers=("NWC", "WIO", "NWC"))
            x = gelu(x + bias.astype(cfg.dtype), False)
        positions = declare(self, "params", "embed_positions",
                            lambda *_: jnp.asarray(sinusoids(cfg.max_source_positions, cfg.d_model)),
                            (cfg.max_source_positions, cfg.d_model), cfg.param_dtype,
                            (None, "audio_embed"))
        return x + positions.astype(cfg.dtype)[None]  # [N, 1500, D]


class WhisperEncoder(nn.Module):
    """mel [N, num_mel_bins, 3000] -> encoder output [N, 1500, d_model] (after the final layer_norm)."""

    config: WhisperConfig

    def setup(self):
        cfg = self.config
        self.stem = WhisperStem(cfg)
        self.layers = scan_layers(
            PreLNEncoderLayer, cfg.num_layers, cfg.remat, "layers", num_heads=cfg.num_heads,
            mlp_dim=cfg.ffn_dim, eps=cfg.layer_norm_eps,
            norm_names=("self_attn_layer_norm", "final_layer_norm"), embed_axis="audio_embed",
            mlp_axis="audio_mlp", key_bias=False, gelu_tanh=False, attention_impl=cfg.attention_impl,
            dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.layer_norm = LayerNorm(cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype)

    def encode(self, mel: jax.Array) -> jax.Array:
        x, _ = self.layers(self.stem(mel), None)
        return self.layer_norm(x)

    def __call__(self, mel: jax.Array) -> jax.Array:
        return scan_chunks(self, WhisperEncoder.encode, mel, self.config.chunk_batch)


class AudioEncoder(nn.Module):
    """Whisper encoder followed by video-SALMONN 2's frozen `ln_speech` LayerNorm (both in params)."""

    config: WhisperConfig

    @nn.compact
    def __call__(self, mel: jax.Array) -> jax.Array:  # [N, M, 3000] -> [N, 1500, D]
        cfg = self.config
        x = WhisperEncoder(cfg, name="whisper")(mel)
        return LayerNorm(cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                         name="ln_speech")(x)


def num_params(cfg: WhisperConfig, with_ln_speech: bool = True) -> int:
    """Closed-form parameter count (positions included, as in the checkpoint)."""
    d, f, m = cfg.d_model, cfg.ffn_dim, cfg.num_mel_bins
    stem = 3 * m * d + d + 3 * d * d + d + cfg.max_source_positions * d
    layer = 4 * d * d + 3 * d + 2 * d * f + f + d + 4 * d
    return stem + cfg.num_layers * layer + 2 * d + (2 * d if with_ln_speech else 0)
