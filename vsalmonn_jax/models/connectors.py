"""Vision connector (projector, 2x2 pooling, image_newline) and audio-visual interleaving.

Trainable parameters (projector, image_newline) live in the `adapter` collection. The interleaving
functions are pure index arithmetic with static shapes (jit-friendly): see `plan_timestamp`
(the clean default), `plan_official` (video-SALMONN 2's nearest-interpolation QUIRK) and
`plan_time_tokens` (per-frame time tokens after each frame's visual tokens).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vsalmonn_jax.models.media_layers import ADAPTER, Dense, declare, gelu
from vsalmonn_jax.models.shards import constrain

POOL_MODES = ("max", "average", "bilinear")
# grid: image_newline after every pooled row (video-SALMONN 2); video: one after the whole media
# (LLaVA-OneVision's video path, the transformers-parity mode); none: no newline
NEWLINE_MODES = ("grid", "video", "none")


class VisionProjector(nn.Module):
    """Linear(vision -> llm) - GELU - Linear(llm -> llm)  (LLaVA-OneVision mlp2x_gelu).
    Kernels start N(0, init_std) (0.02: the HF initializer_range)."""

    features: int
    collection: str = ADAPTER
    dtype: str = "float32"
    param_dtype: str = "float32"
    init_std: float = 0.02

    @nn.compact
    def __call__(self, x):  # [..., vision_hidden] -> [..., features]
        dense = lambda axes, name: Dense(self.features, axes, collection=self.collection,
                                         dtype=self.dtype, param_dtype=self.param_dtype, name=name,
                                         kernel_init=nn.initializers.normal(self.init_std))
        return dense(("mlp", "embed"), "linear_2")(gelu(dense(("vision_embed", "mlp"), "linear_1")(x),
                                                        False))


def pooled_side(grid: int, mode: str, stride: int = 2) -> int:
    """Pooled grid side: floor for max / average (27 -> 13), ceil for bilinear (27 -> 14)."""
    if mode not in POOL_MODES:
        raise ValueError(f"connector.pool_mode must be one of {POOL_MODES}, got {mode!r}")
    if stride <= 1:
        return grid
    return math.ceil(grid / stride) if mode == "bilinear" else grid // stride


def bilinear_matrix(size_in: int, size_out: int) -> np.ndarray:
    """[out, in] weights of torch `interpolate(mode='bilinear', align_corners=False)` along one axis."""
    scale = size_in / size_out
    src = np.maximum((np.arange(size_out) + 0.5) * scale - 0.5, 0.0)
    lo = np.minimum(np.floor(src).astype(np.int64), size_in - 1)
    hi = np.minimum(lo + 1, size_in - 1)
    frac = src - lo
    weights = np.zeros((size_out, size_in), np.float64)
    np.add.at(weights, (np.arange(size_out), lo), 1.0 - frac)
    np.add.at(weights, (np.arange(size_out), hi), frac)
    return weights.astype(np.float32)


def pool_grid(x: jax.Array, mode: str, stride: int = 2) -> jax.Array:
    """Spatial pooling of per-frame tokens: [N, g, g, H] -> [N, r, r, H] (r = pooled_side)."""
    n, g, g2, h = x.shape
    r = pooled_side(g, mode, stride)
    if stride <= 1:
        return x
    if mode == "bilinear":
        w = jnp.asarray(bilinear_matrix(g, r), x.dtype)
        return jnp.einsum("ri,sj,nijh->nrsh", w, w, x, precision=jax.lax.Precision.HIGHEST)
    blocks = x[:, : r * stride, : r * stride].reshape(n, r, stride, r, stride, h)  # floor
    if mode == "max":
        return jnp.max(blocks, axis=(2, 4))
    return jnp.mean(blocks, axis=(2, 4))


def add_newline(x: jax.Array, newline: jax.Array) -> jax.Array:
    """Append the learned `image_newline` after every row: [N, r, r, H] -> [N, r * (r + 1), H]."""
    n, r, c, h = x.shape
    row_end = jnp.broadcast_to(newline.astype(x.dtype), (n, r, 1, h))
    return jnp.concatenate([x, row_end], axis=2).reshape(n, r * (c + 1), h)


class VisionConnector(nn.Module):
    """SigLIP features [B, F, g*g, Hv] -> per-frame tokens [B, F, r * (r + 1), H]: projector, then
    pooling (after the projector, as the official run script), then one image_newline per row."""

    features: int
    grid: int
    pool_mode: str = "max"
    pool_stride: int = 2
    newline: str = "grid"
    collection: str = ADAPTER
    dtype: str = "float32"
    param_dtype: str = "float32"
    init_std: float = 0.02
    cell_embedding: bool = False   # + a learned vector per pooled cell (not in the release)

    @nn.compact
    def __call__(self, vision_features: jax.Array) -> jax.Array:
        b, f, p, hv = vision_features.shape
        if p != self.grid * self.grid:
            raise ValueError(f"vision features {vision_features.shape}: expected {self.grid}^2 patches")
        x = VisionProjector(self.features, self.collection, self.dtype, self.param_dtype,
                            self.init_std, name="projector")(vision_features)
        # [B, F, g*g, H]: the largest connector activation; keep it split over the batch axes
        x = constrain(x, ("batch", None, None, "activation_embed"))
        x = pool_grid(x.reshape(b * f, self.grid, self.grid, self.features), self.pool_mode,
                      self.pool_stride)  # [B*F, r, r, H]
        if self.cell_embedding:   # where each token sits, as a vector the LLM reads directly
            r = x.shape[1]
            cells = declare(self, self.collection, "cell_embedding",
                            nn.initializers.normal(1.0 / math.sqrt(self.features)),
                            (r, r, self.features), self.param_dtype, (None, None, "embed"))
            x = x + cells.astype(x.dtype)[None]
        if self.newline not in NEWLINE_MODES:
            raise ValueError(f"connector.newline must be one of {NEWLINE_MODES}, got {self.newline!r}")
        if self.newline != "none":
            newline = declare(self, self.collection, "image_newline",
                              nn.initializers.normal(1.0 / math.sqrt(self.features)),
                              (self.features,), self.param_dtype, ("embed",))
        if self.newline == "grid":
            x = add_newline(x, newline)
        else:  # "video": one newline after all the media, added by the AV model (append_newline)
            x = x.reshape(b * f, -1, self.features)
        return x.reshape(b, f, -1, self.features)


def append_newline(media: jax.Array, mask: jax.Array, has_frames: jax.Array, newline: jax.Array):
    """One example: media [M, H], valid-prefix mask [M] -> [M + 1, H], [M + 1] with `newline` [H]
    right after the valid prefix when the example has frames (newline mode "video")."""
    length = jnp.sum(mask)
    media = jnp.concatenate([media, jnp.zeros((1, media.shape[-1]), media.dtype)])
    mask = jnp.concatenate([mask, jnp.zeros((1,), bool)])
    media = media.at[length].set(jnp.where(has_frames, newline.astype(media.dtype), media[length]))
    return media, mask.at[length].set(has_frames)


def tokens_per_frame(grid: int, mode: str, stride: int, newline: str) -> int:
    """Visual tokens per frame: 13 * 14 = 182 for the paper's setting (27 grid, max, stride 2)."""
    r = pooled_side(grid, mode, stride)
    return r * (r + (1 if newline == "grid" else 0))


# --------------------------------------------------------------------------- interleaving ----
# Every function below works on ONE example (vmap it over the batch) and returns
# (source index per output slot, number of valid output slots). Sources index the table
# concat([visual.reshape(F * V, H), audio (A, H), zeros (1, H)]); empty slots point at the zero row.


def _plan(num_out: int, num_sources: int, dests: list[jax.Array], srcs: list[jax.Array]) -> jax.Array:
    index = jnp.full((num_out,), num_sources, jnp.int32)
    for d, s in zip(dests, srcs, strict=True):
        index = index.at[d].set(s.astype(jnp.int32), mode="drop")
    return index


def plan_timestamp(num_frames: int, frame_tokens: int, num_audio: int, n_frames: jax.Array,
                   frame_times: jax.Array, n_audio: jax.Array, tokens_per_second: float):
    """Clean interleave: [visual tokens of frame i, audio tokens whose start time falls in frame i's
    span] for i = 0..n-1, where frame i spans [t_i, t_{i+1}) (frame 0 from 0, the last frame to the
    end of the audio), audio token j starts at j / tokens_per_second, and only the n_audio real
    tokens are used (no padding). Length = n_frames * frame_tokens + n_audio.

    Static sizes: num_frames (F), frame_tokens (V), num_audio (A); output M = F * V + A.
    """
    f, v, a = num_frames, frame_tokens, num_audio
    j = jnp.arange(a)
    t = j.astype(jnp.float32) / tokens_per_second  # [A] start time of audio token j
    later = (jnp.arange(f) >= 1) & (jnp.arange(f) < n_frames)  # boundaries b_1 .. b_{n-1}
    frame_of = jnp.sum(later[None, :] & (frame_times[None, :] <= t[:, None] + 1e-6), axis=1)  # [A]
    audio_ok = j < n_audio
    before = jnp.sum(audio_ok[None, :] & (frame_of[None, :] < jnp.arange(f)[:, None]), axis=1)  # [F]
    i, p = jnp.meshgrid(jnp.arange(f), jnp.arange(v), indexing="ij")  # [F, V]
    vis_dest = jnp.where(i < n_frames, i * v + p + before[:, None], f * v + a).reshape(-1)
    aud_dest = jnp.where(audio_ok, jnp.where(n_frames > 0, (frame_of + 1) * v, 0) + j, f * v + a)
    index = _plan(f * v + a, f * v + a, [vis_dest, aud_dest], [jnp.arange(f * v), f * v + j])
    return index, n_frames * v + n_audio


def plan_official(num_frames: int, frame_tokens: int, num_audio: int, n_frames: jax.Array,
                  n_audio_all: jax.Array, sample_time: jax.Array, official_rate: float = 50.0):
    """video-SALMONN 2's interleave (QUIRK): all tokens of the real 30-s chunks (padding included,
    n_audio_all of them) are split into front = first round(sample_time * 50) tokens and back; front
    is nearest-interpolated up to a multiple of n_frames and split evenly (k per frame):
    [frame 0 visual, k audio, frame 1 visual, k audio, ..., back tokens]. Audio-only: all tokens.

    Static output M = F * V + A + F (interpolation adds at most F - 1 slots).
    """
    f, v, a = num_frames, frame_tokens, num_audio
    m = f * v + a + f
    has_frames = n_frames > 0
    front = jnp.where(has_frames, jnp.minimum(jnp.round(sample_time * official_rate).astype(jnp.int32),
                                              n_audio_all), 0)
    nf = jnp.maximum(n_frames, 1)
    delta = front % nf
    new_len = jnp.where(delta == 0, front, front + nf - delta)
    k = jnp.maximum(new_len // nf, 1)
    stride = jnp.where(has_frames, v + new_len // nf, 0)
    i, p = jnp.meshgrid(jnp.arange(f), jnp.arange(v), indexing="ij")
    vis_dest = jnp.where(i < n_frames, i * stride + p, m).reshape(-1)
    q = jnp.arange(a + f)
    scale = front.astype(jnp.float32) / jnp.maximum(new_len, 1).astype(jnp.float32)
    q_src = jnp.minimum(jnp.floor(q.astype(jnp.float32) * scale).astype(jnp.int32), front - 1)
    q_dest = jnp.where(q < new_len, (q // k) * stride + v + q % k, m)
    j = jnp.arange(a)
    back_dest = jnp.where((j >= front) & (j < n_audio_all), n_frames * stride + j - front, m)
    index = _plan(m, f * v + a, [vis_dest, q_dest, back_dest],
                  [jnp.arange(f * v), f * v + q_src, f * v + j])
    return index, n_frames * stride + (n_audio_all - front)


def plan_time_tokens(index: jax.Array, length: jax.Array, num_frames: int, frame_tokens: int,
                     time_slots: int, n_frames: jax.Array, n_time: jax.Array):
    """Per-frame time tokens: n_time slots right after the last visual token of each of the
    n_frames real frames of an interleaved media sequence, whatever follows it (audio tokens in
    "timestamp" / "official", the next frame in video-only sequences):
    [frame 0 visual, time slots of frame 0, (audio), frame 1 visual, ...].

    `index` [M] / `length` are a plan above (sources in concat([visual (F * V), audio, zeros]));
    the returned sources index concat([media (M, H), time slots (F * K, H), zeros (1, H)]), slot j
    of frame i being M + i * K + j. n_time = 0 is the identity. Static output M + F * K; valid
    length = length + n_frames * n_time.
    """
    m, v, f, k = index.shape[0], frame_tokens, num_frames, time_slots
    o = jnp.arange(m)
    valid = o < length
    ends = valid & (index < f * v) & (index % v == v - 1) & (index // v < n_frames)  # [M]
    before = jnp.cumsum(ends) - ends                    # frames ended before slot o
    media_dest = jnp.where(valid, o + before * n_time, m + f * k)
    end_at = _plan(f, m, [jnp.where(ends, index // v, f)], [o])   # [F]: slot of frame i's end
    i, j = jnp.meshgrid(jnp.arange(f), jnp.arange(k), indexing="ij")   # [F, K]
    time_dest = jnp.where((i < n_frames) & (j < n_time), end_at[:, None] + 1 + i * n_time + j,
                          m + f * k)
    new_length = length + n_frames * n_time
    out = _plan(m + f * k, m + f * k, [media_dest, time_dest.reshape(-1)],
                [o, m + i.reshape(-1) * k + j.reshape(-1)])
    return out, new_length


def gather_media(visual: jax.Array, audio: jax.Array, index: jax.Array, length: jax.Array):
    """visual [F, V, H], audio [A, H], plan -> media [M, H], mask bool [M] (one example)."""
    h = visual.shape[-1]
    table = jnp.concatenate([visual.reshape(-1, h), audio, jnp.zeros((1, h), audio.dtype)], axis=0)
    mask = jnp.arange(index.shape[0]) < length
    return jnp.take(table, index, axis=0) * mask[:, None].astype(table.dtype), mask


def audio_token_count(audio_seconds: jax.Array, tokens_per_second: float, max_tokens: jax.Array):
    """Real (non-padding) audio tokens: ceil(seconds * rate), at most what the chunks hold.
    0.4 s -> 1, 29.9 s -> 60, 30 s -> 60, 61 s -> 122 at 2 tokens/s."""
    count = jnp.ceil(audio_seconds * tokens_per_second - 1e-4).astype(jnp.int32)
    return jnp.clip(count, 0, max_tokens)
