"""The whole audio-visual LLM: frozen SigLIP + Whisper, trainable connectors, LoRA-adapted Qwen2.

Four stages (design decision 13): `encode_frozen(batch)` -> media features (no gradient, cacheable),
`connect(media)` -> media_embeds [B, M, H] + media_mask, `splice(...)` -> the LLM inputs with the
media in place of the placeholder token, then the Qwen2 forward on `inputs_embeds`.

Variables: "params" = {vision, audio, llm} (frozen), "adapter" = {vision_connector, audio_connector}
(trainable; connector modules create their variables in the adapter collection directly), "lora" =
{llm: init_lora(params["llm"])}. Omit "lora" to disable LoRA (DPO reference).
An image is a 1-frame video (the official code has no separate image path).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vsalmonn_jax.lora import LoraConfig, init_lora
from vsalmonn_jax.models import connectors
from vsalmonn_jax.models.attention import resolve_impl
from vsalmonn_jax.models.connectors import VisionConnector
from vsalmonn_jax.models.qformer import AudioConnector, QFormerConfig
from vsalmonn_jax.models.qwen2 import Qwen2, Qwen2Config, branch_positions, default_positions
from vsalmonn_jax.models.shards import constrain
from vsalmonn_jax.models.siglip import SiglipConfig, SiglipVision
from vsalmonn_jax.models.whisper import AudioEncoder, WhisperConfig

MEDIA_KEYS = ("frame_mask", "frame_times", "mel_mask", "audio_seconds", "has_video", "has_audio",
              "time_ids", "time_mask")
INTERLEAVE_MODES = ("timestamp", "official")


@dataclasses.dataclass(frozen=True)
class AVConfig:
    llm: Qwen2Config
    vision: SiglipConfig
    audio: WhisperConfig
    qformer: QFormerConfig
    placeholder_id: int
    pool_mode: str = "max"
    pool_stride: int = 2
    newline: str = "grid"
    interleave: str = "timestamp"
    connector_init_std: float = 0.02   # vision projector kernels at init (connector.initializer_range)
    cell_embedding: bool = False       # a learned vector per pooled cell (not in the release)

    @classmethod
    def from_config(cls, config, placeholder_id: int) -> AVConfig:
        """From the full ml_collections config: model.{llm, vision, audio, qformer, connector}."""
        m = config.model
        llm = Qwen2Config.from_config(m.llm)
        compute = dict(dtype=llm.dtype, param_dtype=llm.param_dtype,  # encoders: fused on GPU
                       attention_impl="cudnn" if resolve_impl(llm.attention_impl) == "cudnn" else "xla")
        vision = SiglipConfig.from_config(m.vision, **compute)
        audio = WhisperConfig.from_config(m.audio, **compute)
        qformer = QFormerConfig.from_config(m.qformer, encoder_width=audio.d_model,
                                            llm_hidden=llm.hidden_size, dtype=llm.dtype,
                                            param_dtype="float32")
        c = m.connector
        if c.interleave not in INTERLEAVE_MODES:
            raise ValueError(f"connector.interleave must be one of {INTERLEAVE_MODES}, got {c.interleave!r}")
        return cls(llm=llm, vision=vision, audio=audio, qformer=qformer,
                   placeholder_id=int(placeholder_id), pool_mode=c.pool_mode,
                   pool_stride=int(c.pool_stride), newline=c.newline, interleave=c.interleave,
                   connector_init_std=float(c.get("initializer_range", 0.02)),
                   cell_embedding=bool(c.get("cell_embedding", False)))

    @property
    def frame_tokens(self) -> int:
        """Visual tokens per frame (182 at the paper's shapes)."""
        return connectors.tokens_per_frame(self.vision.grid, self.pool_mode, self.pool_stride,
                                           self.newline)

    @property
    def audio_tokens_per_chunk(self) -> int:
        return self.qformer.tokens_per_chunk(self.audio.max_source_positions)

    @property
    def audio_tokens_per_second(self) -> float:
        """2.0 at the paper's shapes: 1 query per 25 Whisper frames at 50 frames/s."""
        return self.audio_tokens_per_chunk / self.audio.chunk_seconds

    def vision_connector(self) -> VisionConnector:
        """The trainable vision connector module (projector, pooling, image_newline)."""
        return VisionConnector(self.llm.hidden_size, self.vision.grid, self.pool_mode,
                               self.pool_stride, self.newline, dtype=self.llm.dtype,
                               param_dtype="float32", init_std=self.connector_init_std,
                               cell_embedding=self.cell_embedding)

    def media_length(self, frames: int, chunks: int, time_slots: int = 0) -> int:
        """Static media length M for F frame slots, C chunk slots and K time-token slots per frame
        (the valid part is masked)."""
        audio = chunks * self.audio_tokens_per_chunk
        extra = (frames if self.interleave == "official" else 0) + (self.newline == "video")
        return frames * (self.frame_tokens + time_slots) + audio + extra


def _batch_sharded(x: jax.Array, frames: bool = False) -> jax.Array:
    """Keep media activations split over the batch axes (data, fsdp) on their leading dimension, so
    no device encodes or projects every video of the step; `frames`: [B, F, ...] also split on F
    over `context` (the devices sharing a sequence project different frames)."""
    return constrain(x, ("batch",) + ("frames",) * frames + (None,) * (x.ndim - 1 - frames))


class AVLLM(nn.Module):
    """video-SALMONN 2. Methods are used with `apply(..., method=...)`; `__call__` runs all four."""

    config: AVConfig
    lora: LoraConfig | None = None

    def setup(self):
        cfg = self.config
        self.vision = SiglipVision(cfg.vision)
        self.audio = AudioEncoder(cfg.audio)
        self.vision_connector = cfg.vision_connector()
        self.audio_connector = AudioConnector(cfg.qformer)
        self.llm = Qwen2(cfg.llm, lora=self.lora)

    # (1) frozen encoders ------------------------------------------------------------------------
    def encode_frozen(self, batch: dict) -> dict:
        """Batch -> media pytree (batch-major): "vision" [B, F, P, Hv] (SigLIP layer -2) and/or
        "audio" [B, C, 1500, D] (Whisper + ln_speech), plus the masks / times connect() needs.
        Wrapped in stop_gradient: the encoders are frozen."""
        media = {k: jnp.asarray(batch[k]) for k in MEDIA_KEYS if k in batch}
        if "pixel_values" in batch:
            pixels = jnp.asarray(batch["pixel_values"])
            if pixels.ndim != 5:
                raise ValueError(f"pixel_values must be [B, F, S, S, 3], got {pixels.shape}")
            b, f = pixels.shape[:2]
            frames = _batch_sharded(pixels.reshape(b * f, *pixels.shape[2:]))  # [B*F, S, S, 3]
            features = self.vision(frames)
            media["vision"] = _batch_sharded(features.reshape(b, f, *features.shape[1:]), frames=True)
        if "mel" in batch:
            mel = jnp.asarray(batch["mel"])
            if mel.ndim != 4:
                raise ValueError(f"mel must be [B, C, num_mel_bins, 3000], got {mel.shape}")
            b, c = mel.shape[:2]
            features = self.audio(_batch_sharded(mel.reshape(b * c, *mel.shape[2:])))  # [B*C, M, 3000]
            media["audio"] = _batch_sharded(features.reshape(b, c, *features.shape[1:]))
        return jax.lax.stop_gradient(media)

    # (2) trainable connectors + interleaving --------------------------------------------------------
    def connect(self, media: dict, deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
        """Media pytree -> media_embeds [B, M, H], media_mask bool [B, M] (valid prefix).
        deterministic=False: the Q-Former's dropout is on (rng "dropout").

        frame_mask / mel_mask must mark prefixes (see validate_batch). Interleave "timestamp": per
        real frame its visual tokens then the real audio tokens starting in its time span (frame_times);
        "official": the QUIRK of connectors.plan_official, with audio_seconds standing in for the
        official `real_time` (the video duration, to which the official loader cuts the audio)."""
        cfg = self.config
        h = cfg.llm.hidden_size
        ref = media.get("vision", media.get("audio"))
        if ref is None:
            raise ValueError("connect(): the media pytree has neither 'vision' nor 'audio' features")
        b = ref.shape[0]
        if "vision" in media:
            visual = _batch_sharded(self.vision_connector(media["vision"]), frames=True)  # [B, F, V, H]
            frame_mask = media.get("frame_mask", jnp.ones(visual.shape[:2], bool))
            n_frames = jnp.sum(frame_mask & media.get("has_video", jnp.ones((b,), bool))[:, None], 1)
        else:
            visual = jnp.zeros((b, 0, cfg.frame_tokens, h), cfg.llm.dtype)
            n_frames = jnp.zeros((b,), jnp.int32)
        f = visual.shape[1]
        if "audio" in media:
            audio = self.audio_connector(media["audio"], deterministic)  # [B, C*Tc, H]
            audio = _batch_sharded(audio.astype(visual.dtype))
            chunks = media["audio"].shape[1]
            mel_mask = media.get("mel_mask", jnp.ones((b, chunks), bool))
            has_audio = media.get("has_audio", jnp.ones((b,), bool))
            n_all = jnp.sum(mel_mask & has_audio[:, None], 1) * cfg.audio_tokens_per_chunk
            seconds = media.get("audio_seconds", n_all / cfg.audio_tokens_per_second)
        else:
            audio = jnp.zeros((b, 0, h), visual.dtype)
            n_all = jnp.zeros((b,), jnp.int32)
            seconds = jnp.zeros((b,), jnp.float32)
        a = audio.shape[1]
        if cfg.interleave == "official":
            plan = jax.vmap(lambda nf, na, t: connectors.plan_official(f, cfg.frame_tokens, a, nf, na, t))
            index, length = plan(n_frames, n_all, seconds.astype(jnp.float32))
        else:
            n_audio = jnp.minimum(connectors.audio_token_count(
                seconds, cfg.audio_tokens_per_second, a), n_all)
            times = media.get("frame_times", jnp.broadcast_to(jnp.arange(f, dtype=jnp.float32), (b, f)))
            plan = jax.vmap(lambda nf, t, na: connectors.plan_timestamp(
                f, cfg.frame_tokens, a, nf, t, na, cfg.audio_tokens_per_second))
            index, length = plan(n_frames, times.astype(jnp.float32), n_audio)
        embeds, mask = jax.vmap(connectors.gather_media)(visual, audio, index, length)
        if "time_ids" in media and f:
            embeds, mask = self._time_tokens(media, embeds, index, length, n_frames)
        if cfg.newline == "video":  # [B, M + 1, H]: LLaVA-OneVision's one newline after the video
            newline = nn.unbox(self.vision_connector.variables["adapter"]["image_newline"]) \
                if "vision" in media else jnp.zeros((h,), embeds.dtype)
            embeds, mask = jax.vmap(connectors.append_newline, in_axes=(0, 0, 0, None))(
                embeds, mask, n_frames > 0, newline)
        embeds = constrain(embeds, ("batch", "length", "activation_embed"))
        return embeds, mask

    def _time_tokens(self, media: dict, embeds: jax.Array, index: jax.Array, length: jax.Array,
                     n_frames: jax.Array):
        """Insert the per-frame time tokens (time_ids / time_mask [B, F, K], data/time_tokens.py)
        after each real frame's visual tokens (before the audio tokens of its span, if any). Each
        frame gets the example's longest time string's count of slots: its token embeddings, then
        zero vectors (the release's pad_sequence). Which examples get them is the host's choice
        (data.time_tokens: the release gives them to video without audio only); an all-False
        time_mask row is unchanged. `index` / `length`: the interleave plan [B, M] that built
        `embeds`. [B, M, H] -> [B, M + F * K, H]."""
        cfg = self.config
        b, m, h = embeds.shape
        ids = jnp.asarray(media["time_ids"])
        _, f, k = ids.shape
        real_frame = jnp.arange(f)[None, :] < n_frames[:, None]                    # [B, F]
        keep = media["time_mask"] & real_frame[..., None]                         # [B, F, K]
        time = self.llm.embed(ids.reshape(b, f * k)).reshape(b, f, k, h)
        time = (time * keep[..., None].astype(time.dtype)).astype(embeds.dtype)   # [B, F, K, H]
        n_time = jnp.max(jnp.sum(keep, axis=2), axis=1)                          # [B]
        plan = jax.vmap(lambda i, n, nf, nt: connectors.plan_time_tokens(
            i, n, f, cfg.frame_tokens, k, nf, nt))
        index, length = plan(index, length, n_frames, n_time)
        # gather_media's table [first (M, H), second (F*K, H), zeros] is what the plan indexes
        return jax.vmap(connectors.gather_media)(embeds, time.reshape(b, f * k, h), index, length)

    # (3) splice --------------------------------------------------------------------------------
    def splice(self, media_embeds: jax.Array, media_mask: jax.Array, input_ids: jax.Array,
               attention_mask: jax.Array, loss_mask: jax.Array, branch_ids: jax.Array | None = None
               ) -> dict:
        """Put the valid media embeddings where the placeholder token is. Returns, at the spliced
        length L = T + M - 1: inputs_embeds [B,L,H], attention_mask, loss_mask (False on media),
        targets (token ids; 0 on media / padding) [B,L], positions [B,L] (cumsum(mask) - 1).
        Examples without a placeholder get no media (text-only rows of a mixed batch).
        A packed row (branch_ids [B,T], training/packing.py; the placeholder in the prefix) also
        gets "branch_ids" [B,L] (media: 0) and positions continuing from the prefix per branch."""
        cfg = self.config
        b, t = input_ids.shape
        m = media_embeds.shape[1]
        length = t + max(m - 1, 0)
        is_ph = input_ids == cfg.placeholder_id
        has_ph = jnp.any(is_ph, axis=1)
        p = jnp.argmax(is_ph, axis=1)  # [B]
        n_media = jnp.where(has_ph, jnp.sum(media_mask, axis=1), 0)  # [B]
        o = jnp.arange(length)[None, :]  # [1, L]
        in_media = has_ph[:, None] & (o >= p[:, None]) & (o < (p + n_media)[:, None])
        after = has_ph[:, None] & (o >= (p + n_media)[:, None])
        text_idx = jnp.where(after, o - n_media[:, None] + 1, o)  # skip the placeholder itself
        text_ok = (text_idx < t) & ~in_media
        text_idx = jnp.clip(text_idx, 0, t - 1)
        take = lambda x: jnp.take_along_axis(x, text_idx, axis=1)
        ids = jnp.where(text_ok, take(input_ids), 0)
        safe_ids = jnp.clip(jnp.where(ids == cfg.placeholder_id, 0, ids), 0, cfg.llm.vocab_size - 1)
        text_embeds = self.llm.embed(safe_ids)  # [B, L, H]
        media_idx = jnp.clip(o - p[:, None], 0, max(m - 1, 0))
        if m:
            spliced_media = jnp.take_along_axis(media_embeds, media_idx[..., None], axis=1)
        else:
            spliced_media = jnp.zeros_like(text_embeds)
        embeds = jnp.where(in_media[..., None], spliced_media.astype(text_embeds.dtype), text_embeds)
        attn = in_media | (text_ok & take(attention_mask.astype(bool)))
        loss = text_ok & take(loss_mask.astype(bool)) & attn
        out = {"inputs_embeds": embeds, "attention_mask": attn, "loss_mask": loss, "targets": ids,
               "positions": default_positions(attn)}
        if branch_ids is not None:
            out["branch_ids"] = jnp.where(in_media | ~attn, 0, take(branch_ids))
            out["positions"] = branch_positions(attn, out["branch_ids"])
        return out

    # (4) LLM -----------------------------------------------------------------------------------
    def decode(self, spliced: dict, deterministic: bool = True, return_hidden: bool = False):
        """Qwen2 forward on spliced inputs -> logits [B,L,V] fp32 (or final hidden [B,L,H]);
        packed rows (a "branch_ids" entry) attend with the shared-prefix mask."""
        out, _ = self.llm(inputs_embeds=spliced["inputs_embeds"],
                          attention_mask=spliced["attention_mask"], positions=spliced["positions"],
                          deterministic=deterministic, return_hidden=return_hidden,
                          branch_ids=spliced.get("branch_ids"))
        return out

    def lm_logits(self, hidden: jax.Array) -> jax.Array:
        return self.llm.lm_logits(hidden)

    def text_embed(self, ids: jax.Array) -> jax.Array:
        return self.llm.embed(ids)

    def __call__(self, batch: dict, deterministic: bool = True, return_hidden: bool = False,
                 prefix: str = ""):
        """All four stages on a model-ready batch -> (logits or hidden [B,L,...], spliced dict)."""
        if self.is_initializing():  # create the LLM's params before splice() reads its embeddings
            self.llm(jnp.zeros((1, 1), jnp.int32))
        media = self.encode_frozen(batch)
        if "vision" in media or "audio" in media:
            embeds, mask = self.connect(media, deterministic)
        else:
            b = batch[prefix + "input_ids"].shape[0]
            embeds = jnp.zeros((b, 0, self.config.llm.hidden_size), self.config.llm.dtype)
            mask = jnp.zeros((b, 0), bool)
        spliced = self.splice(embeds, mask, jnp.asarray(batch[prefix + "input_ids"]),
                              jnp.asarray(batch[prefix + "attention_mask"]),
                              jnp.asarray(batch[prefix + "loss_mask"]))
        return self.decode(spliced, deterministic, return_hidden), spliced


def dummy_batch(cfg: AVConfig, batch: int = 1, frames: int = 1, chunks: int = 1,
                text_len: int = 8) -> dict:
    """A minimal model-ready batch with both modalities (for init / eval_shape)."""
    s, v = cfg.vision.image_size, cfg.audio
    ids = np.zeros((batch, text_len), np.int32)
    ids[:, 1] = cfg.placeholder_id
    return {"input_ids": ids, "attention_mask": np.ones((batch, text_len), bool),
            "loss_mask": np.ones((batch, text_len), bool),
            "pixel_values": np.zeros((batch, frames, s, s, 3), np.float32),
            "frame_mask": np.ones((batch, frames), bool),
            "frame_times": np.broadcast_to(np.arange(frames, dtype=np.float32), (batch, frames)).copy(),
            "mel": np.zeros((batch, chunks, v.num_mel_bins, v.mel_frames), np.float32),
            "mel_mask": np.ones((batch, chunks), bool),
            "audio_seconds": np.full((batch,), float(v.chunk_seconds * chunks), np.float32),
            "has_video": np.ones((batch,), bool), "has_audio": np.ones((batch,), bool)}


def init_variables(rng: jax.Array, cfg: AVConfig, lora: LoraConfig | None = None) -> dict:
    """{"params", "adapter"} (+ "lora" = {"llm": ...} when `lora` is given); boxed leaves."""
    k_init, k_lora = jax.random.split(rng)
    variables = dict(jax.jit(AVLLM(cfg, lora).init)(k_init, dummy_batch(cfg)))
    if lora is not None:
        variables["lora"] = {"llm": init_lora(k_lora, nn.unbox(variables["params"]["llm"]), lora)}
    return variables


def init_adapter(rng: jax.Array, cfg: AVConfig) -> dict:
    """A fresh `adapter` collection alone (connectors only: no encoder or LLM is built)."""
    k_vision, k_audio = jax.random.split(rng)
    vision = jnp.zeros((1, 1, cfg.vision.num_patches, cfg.vision.hidden_size), cfg.llm.dtype)
    audio = jnp.zeros((1, 1, cfg.qformer.window, cfg.audio.d_model), cfg.llm.dtype)
    return {"vision_connector": cfg.vision_connector().init(k_vision, vision)["adapter"],
            "audio_connector": AudioConnector(cfg.qformer).init(k_audio, audio)["adapter"]}


def validate_batch(batch: dict, placeholder_id: int, prefix: str = "") -> None:
    """Host-side check: every example with media has exactly one placeholder, none without media,
    and frame_mask / mel_mask mark a prefix (real frames / chunks first, padding after).
    Raises ValueError naming the example_id."""
    ids = np.asarray(batch[prefix + "input_ids"])
    example_ids = np.asarray(batch.get("example_id", np.arange(ids.shape[0])))
    for key in ("frame_mask", "mel_mask"):
        if key in batch:
            mask = np.asarray(batch[key]).astype(bool)
            prefix_ok = np.all(mask[:, 1:] <= mask[:, :-1], axis=1) if mask.shape[1] > 1 else \
                np.ones(mask.shape[0], bool)
            if not prefix_ok.all():
                row = int(np.argmin(prefix_ok))
                raise ValueError(f"example_id {int(example_ids[row])}: {key} {mask[row].tolist()} "
                                 "is not a prefix (padding must come after the real entries)")
    counts = (ids == placeholder_id).sum(axis=1)
    has_media = np.zeros(ids.shape[0], bool)
    for key in ("has_video", "has_audio"):
        if key in batch:
            has_media |= np.asarray(batch[key]).astype(bool)
    for row, (count, media) in enumerate(zip(counts, has_media, strict=True)):
        if media and count != 1:
            raise ValueError(f"example_id {int(example_ids[row])}: {prefix}input_ids has {count} "
                             f"media placeholder tokens (id {placeholder_id}); exactly 1 expected")
        if not media and count:
            raise ValueError(f"example_id {int(example_ids[row])}: {prefix}input_ids has a media "
                             f"placeholder but the example has no video or audio")
