"""One record -> one unpadded example: decoded media features (through the .npz cache) and token ids.

`Featurizer` is picklable (settings only; the tokenizer loads lazily per process) so grain worker
processes run it. Failures come back as `{"failed": reason, ...}` examples for the quarantine.
"""

from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np

from vsalmonn_jax.data import cache, features, text
from vsalmonn_jax.data.media import Media, MediaError, load_media
from vsalmonn_jax.data.time_tokens import time_token_fields, wants_time_tokens


@dataclasses.dataclass(frozen=True)
class FeatureSettings:
    """Everything that decides an example's arrays (part of the cache key)."""

    image_size: int = 384
    num_mel_bins: int = 128
    fps: float = 1.0
    max_frames: int = 110
    sample_rate: int = 16000
    min_audio_seconds: float = 1.0
    missing_audio: str = "silence"
    channel: str = "first"
    frame_sampling: str = "grid"
    audio_cut: str = "none"
    video_audio: str = "track"

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> FeatureSettings:
        data = config.data
        return cls(image_size=int(config.model.vision.image_size),
                   num_mel_bins=int(config.model.audio.num_mel_bins), fps=float(data.fps),
                   max_frames=int(data.max_frames), sample_rate=int(data.sample_rate),
                   min_audio_seconds=float(data.min_audio_seconds),
                   missing_audio=str(data.missing_audio), channel=str(data.audio_channel),
                   frame_sampling=str(data.get("frame_sampling", "grid")),
                   audio_cut=str(data.get("audio_cut", "none")),
                   video_audio=str(data.get("video_audio", "track")))

    def load(self, video: str | None, audio: str | None) -> Media:
        """Decode a record's media with these settings (data/media.py load_media)."""
        return load_media(video, audio, fps=self.fps, max_frames=self.max_frames,
                          sample_rate=self.sample_rate, min_audio_seconds=self.min_audio_seconds,
                          missing_audio=self.missing_audio, channel=self.channel,
                          frame_sampling=self.frame_sampling, audio_cut=self.audio_cut,
                          image_size=self.image_size, video_audio=self.video_audio)


def _key_settings(settings: FeatureSettings) -> dict:
    """The settings part of a media cache key; a field added later is left out at the value it
    had before (defaults.LEGACY_VALUES: entries cached then keep their keys)."""
    from vsalmonn_jax.defaults import LEGACY_VALUES

    return {k: v for k, v in dataclasses.asdict(settings).items()
            if LEGACY_VALUES.get(f"data.{k}", object()) != v}


def media_features(video: str | None, audio: str | None, settings: FeatureSettings,
                   cache_dir: str = "") -> dict[str, np.ndarray]:
    """Decode + featurise one record's media (or read it from the cache).

    Returns pixels uint8 [F, S, S, 3] (resized, normalised at batching), frame_times [F],
    mel float32 [C, bins, 3000], audio_seconds, video_seconds, has_video, has_audio (0-d arrays).
    """
    key = None
    if cache_dir:
        try:
            key = cache.media_key({"video": video, "audio": audio}, _key_settings(settings))
        except OSError as err:
            raise MediaError(video or audio, "missing", str(err)) from err
        hit = cache.load(cache_dir, key)
        if hit is not None:
            return hit
    media = settings.load(video, audio)
    out = {
        "pixels": features.siglip_resize(media.frames, settings.image_size) if media.has_video
        else np.zeros((0, settings.image_size, settings.image_size, 3), np.uint8),
        "frame_times": media.frame_times.astype(np.float32),
        "mel": features.log_mel_chunks(media.audio, settings.num_mel_bins),
        "audio_seconds": np.float32(media.audio_seconds),
        "video_seconds": np.float64(media.video_seconds),   # float64: time tokens round it
        "has_video": np.bool_(media.has_video),
        "has_audio": np.bool_(media.has_audio),
    }
    if key is not None:
        cache.save(cache_dir, key, out)
    return out


def caption_prompt_ids(record: dict, tokenizer, default_prompt: str, **kw) -> np.ndarray:
    """The prompt a caption record is decoded from: its "prompt" (else `default_prompt`) as one user
    turn; a record in the release's conversation form (its test sets: no "prompt") is prompted as the
    release's av_dataset does: every turn but a last assistant one (history kept), then that turn's
    "prefix", if any, after "<|im_start|>assistant\n" (the model continues it; the caption is what
    it writes after the prefix)."""
    turns = record.get("conversations")
    if record.get("prompt") or not turns:
        return text.encode_prompt(tokenizer, record.get("prompt") or default_prompt, **kw)
    from vsalmonn_jax.data.records import conversation_turns

    normalised = conversation_turns(turns, need_assistant=False)
    prefix = ""
    if normalised[-1]["role"] == "assistant":
        prefix = str(turns[-1].get("prefix") or "")
        normalised = normalised[:-1]
    if not any(t["role"] == "user" for t in normalised):
        raise ValueError("conversations holds no user turn before its last answer: nothing to "
                         "prompt with")
    ids, _ = text.encode_conversation(tokenizer, normalised, add_generation_prompt=True, **kw)
    if prefix:
        ids = np.concatenate([ids, np.asarray(tokenizer.encode(prefix, add_special_tokens=False),
                                              np.int32)])
    return ids


def media_positions(example: dict, av_config) -> int:
    """Positions a featurised example's media add to its text when they replace the placeholder
    token: its own frames, audio chunks and per-frame time-token slots (padding inside them
    included, so never fewer than the model's count); 0 without media."""
    frames = example["pixels"].shape[0] if bool(example.get("has_video")) and "pixels" in example else 0
    chunks = example["mel"].shape[0] if bool(example.get("has_audio")) and "mel" in example else 0
    slots = example["time_ids"].shape[1] if "time_ids" in example else 0
    if not frames and not chunks:
        return 0
    return av_config.media_length(frames, chunks, slots) - 1


def text_fields(record: dict, tokenizer, *, placeholder: str, max_length: int, truncation: str,
                default_prompt: str, has_media: bool, prompt_format: str = "clean",
                reserved: int = 0) -> dict[str, np.ndarray]:
    """Token ids + loss masks of a record, by kind (prompt-only kinds get an all-False mask);
    `reserved` positions (the media's) count against max_length."""
    kw = dict(placeholder=placeholder, has_media=has_media, max_length=max_length,
              truncation=truncation, prompt_format=prompt_format, reserved=reserved)
    kind = record["kind"]
    if kind == "sft":
        ids, mask = text.encode_conversation(tokenizer, record["conversations"], **kw)
        return {"input_ids": ids, "loss_mask": mask}
    if kind in ("caption", "mcq"):
        ids = caption_prompt_ids(record, tokenizer, default_prompt, **kw) if kind == "caption" else \
            text.encode_prompt(tokenizer, text.mcq_prompt(record["question"], record["options"]), **kw)
        out = {"input_ids": ids, "loss_mask": np.zeros(ids.shape, bool)}
        if kind == "mcq":
            out["answer"] = np.int32(record["answer"])
        return out
    out = {}
    for name in ("chosen", "rejected", "gt"):
        response = record.get(name)
        if response is None:   # CE-only record: no pair; gt-only records have no chosen/rejected
            ids, mask = np.zeros((0,), np.int32), np.zeros((0,), bool)
        else:
            ids, mask = text.encode_response(tokenizer, record["prompt"], response,
                                             ended=record.get(f"{name}_stopped") is not False, **kw)
        out[f"{name}_input_ids"], out[f"{name}_loss_mask"] = ids, mask
    out["has_pair"] = np.bool_(record.get("chosen") is not None)
    for name in ("ref_chosen_logps", "ref_rejected_logps"):
        if name in record:
            out[name] = np.float32(record[name])
    return out


@dataclasses.dataclass
class Featurizer:
    """record dict -> example dict (or a failure dict). Picklable; runs in grain workers."""

    settings: FeatureSettings
    tokenizer_path: str
    placeholder: str = "<media>"
    max_length: int = 32768
    truncation: str = "error"
    default_prompt: str = "Please describe the video in detail."
    cache_dir: str = ""
    prompt_format: str = "clean"
    time_tokens: str = "none"
    av_config: object = None   # models.av_llm.AVConfig: max_length counts the media's positions
    _tokenizer: object = dataclasses.field(default=None, repr=False, compare=False)

    def __post_init__(self):
        wants_time_tokens(self.time_tokens, False, False)   # a bad data.time_tokens fails here

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, tokenizer_path: str | None = None
                    ) -> Featurizer:
        from vsalmonn_jax.models.pretrained import av_config

        return cls(settings=FeatureSettings.from_config(config),
                   tokenizer_path=str(tokenizer_path or config.data.tokenizer),
                   placeholder=str(config.model.connector.placeholder_token),
                   max_length=int(config.data.max_length), truncation=str(config.data.truncation),
                   default_prompt=str(config.generate.prompt),
                   cache_dir=str(config.data.encoder_cache),
                   prompt_format=str(config.data.get("prompt_format", "clean")),
                   time_tokens=str(config.data.get("time_tokens", "none")),
                   av_config=av_config(config))

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_tokenizer"] = None
        return state

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = text.load_tokenizer(self.tokenizer_path, self.placeholder)
        return self._tokenizer

    def text(self, record: dict, has_media: bool, reserved: int = 0) -> dict[str, np.ndarray]:
        """`text_fields` of a record with this featurizer's tokenizer and text settings."""
        return text_fields(record, self.tokenizer, placeholder=self.placeholder,
                           max_length=self.max_length, truncation=self.truncation,
                           default_prompt=self.default_prompt, has_media=has_media,
                           prompt_format=self.prompt_format, reserved=reserved)

    def fit_media(self, record: dict, fields: dict) -> dict:
        """Text fields to update `fields` (text + media) with: the text again with the media's
        positions reserved when both pass max_length (as the release, which cuts the embedded
        sequence at its model_max_length), truncated under truncation=truncate_response, else a
        failure dict {"failed": "text", "detail"}; {} when they fit."""
        extra = media_positions(fields, self.av_config) if self.av_config is not None else 0
        longest = max((len(v) for k, v in fields.items() if k.endswith("input_ids")), default=0)
        if not extra or longest + extra <= self.max_length:
            return {}
        try:
            return self.text(record, True, reserved=extra)
        except ValueError as err:
            return {"failed": "text", "detail": f"with its media: {err}"}

    def _time_tokens(self, record: dict, fields: dict) -> dict:
        """Per-frame time tokens of a video without audio; a still image (one frame, no duration)
        has no time and gets none; a moving video whose duration is unknown cannot be timed."""
        seconds, frames = float(fields["video_seconds"]), int(fields["pixels"].shape[0])
        if seconds > 0:
            return time_token_fields(self.tokenizer, seconds, frames)
        if frames == 1:
            return {}
        raise MediaError(record.get("video", ""), "no-duration",
                         f"{frames} frames but no duration: the per-frame time tokens "
                         "(data.time_tokens) need it; remux the file into a container (.mp4 / .mkv)")

    def __call__(self, record: dict) -> dict:
        base = {"example_id": np.int64(record.get("index", -1)), "id": record.get("id", ""),
                "source": record.get("source", ""), "line": record.get("line", 0),
                "video": record.get("video"), "audio": record.get("audio")}
        has_media = "video" in record or "audio" in record
        try:
            fields = self.text(record, has_media)
        except ValueError as err:   # text that does not fit the template or the length budget
            return {**base, "failed": "text", "detail": str(err)}
        try:
            if has_media:
                fields.update(media_features(record.get("video"), record.get("audio"),
                                             self.settings, self.cache_dir))
                if wants_time_tokens(self.time_tokens, bool(fields["has_video"]),
                                     bool(fields["has_audio"])):
                    fields.update(self._time_tokens(record, fields))
                fitted = self.fit_media(record, fields)
                if "failed" in fitted:   # text + media past max_length
                    return {**base, **fitted}
                fields.update(fitted)
            else:
                fields.update(has_video=np.bool_(False), has_audio=np.bool_(False),
                              audio_seconds=np.float32(0.0))
        except MediaError as err:
            return {**base, "failed": err.reason, "detail": str(err)}
        return {**base, **fields}
