"""The demo's stand-in for pretrained encoders: frozen random towers whose cached outputs are
standardised per feature dimension, with statistics measured once on the training clips.

Why: a random SigLIP's outputs are dominated by one constant vector (the black background patches
are ~all of a frame), and the content signal is a few per cent of it. Measured on the demo's data
(colour of the first shape, 300 steps from the cached features): raw features 25 % (chance; the LLM
ignored the media, shuffling it left the loss unchanged), centred 70 %, standardised 99 %. A
pretrained tower's features are roughly centred and scaled; this fixed affine map gives the random
towers that property. It is applied to the encoder-output cache only (the towers are never run again).
"""

from __future__ import annotations

import numpy as np

AUDIO_FRAMES_PER_SECOND = 50   # Whisper encoder positions per second (100 mel frames / conv stride 2)


def valid_masks(media: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Which cached positions hold real content: vision [N, F] (frame_mask), audio [N, 1, T]
    (the first audio_seconds x 50 positions of the single chunk)."""
    t = media["audio"].shape[2]
    frames = np.ceil(media["audio_seconds"] * AUDIO_FRAMES_PER_SECOND).astype(int)   # [N]
    audio = np.arange(t)[None, None, :] < frames[:, None, None]                       # [N, 1, T]
    return {"vision": media["frame_mask"], "audio": audio}


def feature_stats(media: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-dimension (mean, std) of the vision [N, F, P, H] and audio [N, 1, T, D] features over
    their valid positions (fp32)."""
    masks = valid_masks(media)
    stats = {}
    for name, mask in masks.items():
        x = media[name]
        picked = x[mask].astype(np.float32)                  # vision [n, P, H] / audio [n, D]
        picked = picked.reshape(-1, x.shape[-1])
        stats[name] = (picked.mean(0), picked.std(0) + 1e-6)
    return stats


def standardize(media: dict[str, np.ndarray], stats: dict) -> dict[str, np.ndarray]:
    """(x - mean) / std per dimension on vision and audio (fp16 kept); other fields unchanged."""
    out = dict(media)
    for name, (mean, std) in stats.items():
        out[name] = ((media[name].astype(np.float32) - mean) / std).astype(media[name].dtype)
    return out
