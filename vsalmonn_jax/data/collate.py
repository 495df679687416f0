"""Examples -> one model-ready batch: padding to bucketed shapes so jit sees few distinct shapes.

Text length T: the smallest `length_buckets` entry that fits (next power of two >= 16 when none
is given or none fits); frames F: next power of two capped at max_frames (at least 1);
mel chunks C: the batch maximum (at least 1); per-frame time tokens K (only when an example has
them): next power of two >= 4. Padding is on the right, masks mark real entries.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vsalmonn_jax.data.features import CHUNK_FRAMES, siglip_normalize
from vsalmonn_jax.data.time_tokens import stack_time_tokens

TEXT_PREFIXES = ("", "chosen_", "rejected_", "gt_")


def _pow2(n: int, minimum: int = 1) -> int:
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def bucket_length(length: int, buckets: Sequence[int] = ()) -> int:
    fits = [b for b in sorted(buckets) if b >= length]
    return fits[0] if fits else _pow2(length, 16)


def frame_bucket(frames: int, max_frames: int) -> int:
    return max(1, min(_pow2(frames), max(max_frames, frames)))


def _text(examples: list[dict], prefix: str, length: int, pad_id: int) -> dict[str, np.ndarray]:
    ids = np.full((len(examples), length), pad_id, np.int32)
    attention = np.zeros((len(examples), length), bool)
    loss = np.zeros((len(examples), length), bool)
    for b, ex in enumerate(examples):
        n = ex[f"{prefix}input_ids"].shape[0]
        ids[b, :n] = ex[f"{prefix}input_ids"]
        attention[b, :n] = True
        loss[b, :n] = ex[f"{prefix}loss_mask"]
    return {f"{prefix}input_ids": ids, f"{prefix}attention_mask": attention,
            f"{prefix}loss_mask": loss}


def _time_tokens(examples: list[dict], frames: int) -> dict[str, np.ndarray]:
    """time_ids int32 / time_mask bool [B, F, K] (K: power of two >= 4 holding the longest)."""
    width = _pow2(max(ex["time_ids"].shape[1] for ex in examples if "time_ids" in ex), 4)
    return stack_time_tokens([ex if "time_ids" in ex else None for ex in examples], frames, width)


def collate(examples: list[dict], *, pad_id: int, image_size: int, num_mel_bins: int,
            max_frames: int = 110, length_buckets: Sequence[int] = ()) -> dict[str, np.ndarray]:
    """Stack unpadded examples (from `Featurizer`) into the shared batch contract."""
    if not examples:
        raise ValueError("collate needs at least one example")
    batch: dict[str, np.ndarray] = {}
    prefixes = [p for p in TEXT_PREFIXES if f"{p}input_ids" in examples[0]]
    longest = max(ex[f"{p}input_ids"].shape[0] for ex in examples for p in prefixes)
    length = bucket_length(longest, length_buckets)
    for prefix in prefixes:
        batch.update(_text(examples, prefix, length, pad_id))
    size = len(examples)
    frames = frame_bucket(max(ex.get("pixels", np.zeros((0,))).shape[0] for ex in examples),
                          max_frames)
    chunks = max([1] + [ex["mel"].shape[0] for ex in examples if "mel" in ex])
    pixels = np.zeros((size, frames, image_size, image_size, 3), np.uint8)
    pixels[:] = 128                                   # normalises to ~0 in padded frames
    batch["frame_mask"] = np.zeros((size, frames), bool)
    batch["frame_times"] = np.zeros((size, frames), np.float32)
    batch["mel"] = np.zeros((size, chunks, num_mel_bins, CHUNK_FRAMES), np.float32)
    batch["mel_mask"] = np.zeros((size, chunks), bool)
    for b, ex in enumerate(examples):
        if "pixels" in ex and ex["pixels"].shape[0]:
            n = ex["pixels"].shape[0]
            pixels[b, :n] = ex["pixels"]
            batch["frame_mask"][b, :n] = True
            batch["frame_times"][b, :n] = ex["frame_times"]
        if "mel" in ex:
            c = ex["mel"].shape[0]
            batch["mel"][b, :c] = ex["mel"]
            batch["mel_mask"][b, :c] = True
    if any("time_ids" in ex for ex in examples):
        batch.update(_time_tokens(examples, frames))
    batch["pixel_values"] = siglip_normalize(pixels)
    batch["audio_seconds"] = np.asarray([ex["audio_seconds"] for ex in examples], np.float32)
    batch["has_video"] = np.asarray([bool(ex["has_video"]) for ex in examples])
    batch["has_audio"] = np.asarray([bool(ex["has_audio"]) for ex in examples])
    batch["example_id"] = np.asarray([ex["example_id"] for ex in examples], np.int64)
    for name in ("answer", "has_pair", "ref_chosen_logps", "ref_rejected_logps"):
        if all(name in ex for ex in examples):
            batch[name] = np.asarray([ex[name] for ex in examples])
    return batch
