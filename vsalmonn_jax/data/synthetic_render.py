"""Drawing a synthetic scene: frames with flat-coloured shapes on a grid, and an audio track with
tones, chirps and noise bursts at their seconds. Deterministic per (seed, clip)."""

from __future__ import annotations

import numpy as np

from vsalmonn_jax.data.synthetic_scene import Scene

RGB = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 240), "yellow": (240, 220, 40)}
BACKGROUND = (24, 24, 24)
SOUND_SECONDS = 0.5


def shape_mask(shape: str, size: int, cx: float, cy: float, radius: float) -> np.ndarray:
    """bool [size, size]: the shape centred at (cx, cy)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        return dx * dx + dy * dy <= radius * radius
    if shape == "square":
        return (np.abs(dx) <= 0.8 * radius) & (np.abs(dy) <= 0.8 * radius)
    if shape == "triangle":
        return (dy <= radius) & (dy >= -radius) & (np.abs(dx) <= (dy + radius) / 2)
    if shape == "cross":
        bar = radius / 3
        return ((np.abs(dx) <= bar) & (np.abs(dy) <= radius)) | \
               ((np.abs(dy) <= bar) & (np.abs(dx) <= radius))
    raise ValueError(f"unknown shape {shape!r}")


def render_frames(scene: Scene, frame_size: int = 64, grid: int = 4) -> np.ndarray:
    """uint8 [seconds, frame_size, frame_size, 3]: frame t shows the state at second t."""
    frames = np.empty((scene.seconds, frame_size, frame_size, 3), np.uint8)
    frames[:] = BACKGROUND
    cell = frame_size / grid
    radius = 0.4 * cell
    for track in scene.tracks:
        for t in range(scene.seconds):
            if track.visible[t]:
                cx, cy = (track.cell[t] + 0.5) * cell
                frames[t][shape_mask(track.shape, frame_size, cx, cy, radius)] = RGB[track.colour[t]]
    return frames


def sound_wave(name: str, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """float32 [SOUND_SECONDS * sample_rate]: one sound event with 10-ms fades."""
    n = int(SOUND_SECONDS * sample_rate)
    t = np.arange(n) / sample_rate
    if name == "a high beep":
        wave = np.sin(2 * np.pi * 1760.0 * t)
    elif name == "a low beep":
        wave = np.sin(2 * np.pi * 330.0 * t)
    elif name in ("a rising chirp", "a falling chirp"):
        f0, f1 = (300.0, 2400.0) if name == "a rising chirp" else (2400.0, 300.0)
        k = np.log(f1 / f0) / SOUND_SECONDS
        wave = np.sin(2 * np.pi * f0 * (np.exp(k * t) - 1) / k)
    elif name == "a noise burst":
        wave = np.clip(rng.standard_normal(n) * 0.5, -1, 1)
    else:
        raise ValueError(f"unknown sound {name!r}")
    fade = np.minimum(1.0, np.minimum(t, SOUND_SECONDS - t) / 0.01)
    return (0.3 * wave * fade).astype(np.float32)


def render_audio(scene: Scene, seed: int, sample_rate: int = 16000) -> np.ndarray:
    """float32 [seconds * sample_rate]: faint noise floor plus each sound starting at its second."""
    rng = np.random.default_rng([int(seed), int(scene.index), 3])
    audio = (rng.standard_normal(scene.seconds * sample_rate) * 0.003).astype(np.float32)
    for t, name in scene.sounds:
        wave = sound_wave(name, sample_rate, rng)
        start = int((t + 0.05) * sample_rate)
        audio[start:start + wave.shape[0]] += wave[: audio.shape[0] - start]
    return audio
