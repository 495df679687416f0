"""SigLIP vision tower (frozen) in Flax linen: patch embedding, learned positions, pre-LN encoder.

Features are the output of encoder layer `select_layer` (hidden_states[-2] by default: the last layer is
never built, there is no post-layernorm and no pooling head); frames run in chunks of `frame_chunk`.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax

from vsalmonn_jax.models.media_layers import (
    PreLNEncoderLayer,
    config_from_section,
    declare,
    scan_chunks,
    scan_layers,
)


@dataclasses.dataclass(frozen=True)
class SiglipConfig:
    hidden_size: int
    intermediate_size: int
    num_layers: int          # layers of the pretrained tower (27 for so400m)
    num_heads: int
    image_size: int = 384
    patch_size: int = 14
    layer_norm_eps: float = 1e-6
    select_layer: int = -2   # index into hidden_states (embeddings, layer 1, ..., layer L)
    frame_chunk: int = 16    # frames per scan step (0 = all at once)
    num_channels: int = 3
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False
    attention_impl: str = "xla"   # xla | cudnn (set from model.llm.attention_impl)
    position_init_std: float = 0.02   # learned positions at random init (checkpoints replace them)

    @classmethod
    def from_config(cls, section, **overrides) -> SiglipConfig:
        return config_from_section(cls, section, **overrides)

    @property
    def grid(self) -> int:
        """Patches per side (27 for 384 / 14)."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def used_layers(self) -> int:
        """Encoder layers actually built and run: hidden_states[select_layer] needs this many."""
        index = self.select_layer % (self.num_layers + 1)
        if index == 0:
            raise ValueError(f"vision.select_layer={self.select_layer} selects the patch embeddings")
        return index


class SiglipEmbeddings(nn.Module):
    """Conv patch embedding (kernel = stride = patch) + learned positions -> [N, P, H]."""

    config: SiglipConfig

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        cfg = self.config
        n, s, _, c = pixel_values.shape
        if s != cfg.image_size or pixel_values.shape[2] != cfg.image_size or c != cfg.num_channels:
            raise ValueError(f"pixel_values {pixel_values.shape}: expected [N, {cfg.image_size}, "
                             f"{cfg.image_size}, {cfg.num_channels}] (vision.image_size)")
        g, ps = cfg.grid, cfg.patch_size
        kernel = declare(self, "params", "patch_embedding", nn.initializers.lecun_normal(),
                         (ps, ps, c, cfg.hidden_size), cfg.param_dtype,
                         (None, None, "conv_in", "vision_embed"))
        bias = declare(self, "params", "patch_bias", nn.initializers.zeros, (cfg.hidden_size,),
                       cfg.param_dtype, ("vision_embed",))
        positions = declare(self, "params", "position_embedding", nn.initializers.normal(cfg.position_init_std),
                            (g * g, cfg.hidden_size), cfg.param_dtype, (None, "vision_embed"))
        x = pixel_values[:, : g * ps, : g * ps].astype(cfg.dtype)  # conv 'valid' drops the remainder
        x = x.reshape(n, g, ps, g, ps, c).transpose(0, 1, 3, 2, 4, 5)  # [N, g, g, ps, ps, C]
        x = x.reshape(n, g * g, ps * ps * c)
        x = x @ kernel.reshape(ps * ps * c, cfg.hidden_size).astype(cfg.dtype) + bias.astype(cfg.dtype)
        return x + positions.astype(cfg.dtype)[None]  # [N, P, H]


class SiglipVision(nn.Module):
    """pixel_values [N, S, S, 3] (SigLIP-normalised, NHWC) -> features [N, grid*grid, hidden]."""

    config: SiglipConfig

    def setup(self):
        cfg = self.config
        self.embeddings = SiglipEmbeddings(cfg)
        self.layers = scan_layers(
            PreLNEncoderLayer, cfg.used_layers, cfg.remat, "layers", num_heads=cfg.num_heads,
            mlp_dim=cfg.intermediate_size, eps=cfg.layer_norm_eps,
            norm_names=("layer_norm1", "layer_norm2"), embed_axis="vision_embed",
            mlp_axis="vision_mlp", key_bias=True, gelu_tanh=True, attention_impl=cfg.attention_impl,
            dtype=cfg.dtype, param_dtype=cfg.param_dtype)

    def encode(self, pixel_values: jax.Array) -> jax.Array:
        x, _ = self.layers(self.embeddings(pixel_values), None)
        return x

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        return scan_chunks(self, SiglipVision.encode, pixel_values, self.config.frame_chunk)


def num_params(cfg: SiglipConfig) -> int:
    """Closed-form parameter count of the tower as built (used_layers layers, no post-LN / head)."""
    h, m, ps, c = cfg.hidden_size, cfg.intermediate_size, cfg.patch_size, cfg.num_channels
    layer = 4 * (h * h + h) + 2 * h * m + m + h + 4 * h
    return ps * ps * c * h + h + cfg.num_patches * h + cfg.used_layers * layer
