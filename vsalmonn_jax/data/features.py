"""Model input features in numpy: SigLIP pixels (exact PIL bicubic resize) and Whisper log-mel chunks.

Equal to `transformers` `SiglipImageProcessor` (PIL backend) and `WhisperFeatureExtractor` without
calling them: tests/data/test_features.py checks both to atol 1e-4.
"""

from __future__ import annotations

import functools

import numpy as np

# ---------------------------------------------------------------- SigLIP pixels (PIL bicubic) ----

_PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed-point precision for 8-bit resampling
_SIGLIP_MEAN = 0.5
_SIGLIP_STD = 0.5


def _bicubic(x: np.ndarray) -> np.ndarray:
    """Pillow's bicubic kernel (a = -0.5), support 2."""
    a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


@functools.lru_cache(maxsize=64)
def _resample_matrix(in_size: int, out_size: int) -> np.ndarray:
    """Dense [in_size, out_size] fixed-point weights, bit-equal to Pillow's `precompute_coeffs`.

    Column j holds the integer taps of output pixel j (Pillow normalises the taps to sum 1 in
    float64 and rounds them to 22-bit fixed point, half away from zero).
    """
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    weights = np.zeros((in_size, out_size), np.float64)
    for out in range(out_size):
        center = (out + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        taps = _bicubic((np.arange(lo, hi) - center + 0.5) / filterscale)
        total = taps.sum()
        if total != 0.0:
            taps = taps / total
        fixed = np.where(taps < 0, -0.5 + taps * (1 << _PRECISION_BITS),
                         0.5 + taps * (1 << _PRECISION_BITS))
        weights[lo:hi, out] = np.trunc(fixed)
    weights.setflags(write=False)
    return weights


def _clip8(acc: np.ndarray) -> np.ndarray:
    """Pillow's `clip8`: add the rounding half, shift out the fraction, clamp to [0, 255]."""
    return np.clip(np.floor((acc + (1 << (_PRECISION_BITS - 1))) / (1 << _PRECISION_BITS)), 0, 255)


def resize_bicubic_uint8(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [N, H, W, C] -> uint8-valued float64 [N, height, width, C], equal to PIL `BICUBIC`.

    Horizontal pass first, then vertical, each rounded to 8 bits as Pillow does. The products
    are integers below 2**53, so the float64 matmuls are exact.
    """
    n, in_h, in_w, channels = frames.shape
    x = frames.astype(np.float64)
    if in_w != width:
        # [N, H, C, W] @ [W, width] -> [N, H, C, width]
        x = _clip8(np.moveaxis(x, 3, 2) @ _resample_matrix(in_w, width))
        x = np.moveaxis(x, 2, 3)                                   # [N, H, width, C]
    if in_h != height:
        # [height, H] @ [H, N*width*C] -> [height, N*width*C]
        flat = np.moveaxis(x, 1, 0).reshape(in_h, -1)
        y = _clip8(_resample_matrix(in_h, height).T @ flat)
        x = np.moveaxis(y.reshape(height, n, width, channels), 0, 1)
    return x


def siglip_resize(frames: np.ndarray, image_size: int = 384) -> np.ndarray:
    """RGB uint8 frames [N, H, W, 3] -> uint8 [N, image_size, image_size, 3], Pillow-exact bicubic."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"siglip_pixels expects uint8 frames [N, H, W, 3], got "
                         f"{frames.dtype} {frames.shape}")
    if frames.shape[0] == 0:
        return np.zeros((0, image_size, image_size, 3), np.uint8)
    return resize_bicubic_uint8(frames, image_size, image_size).astype(np.uint8)


def siglip_normalize(pixels: np.ndarray) -> np.ndarray:
    """uint8 pixels [..., 3] -> float32 in [-1, 1]: rescale by 1/255, mean = std = 0.5."""
    rescaled = (np.asarray(pixels, np.float64) * (1.0 / 255.0)).astype(np.float32)
    return (rescaled - np.float32(_SIGLIP_MEAN)) / np.float32(_SIGLIP_STD)


def siglip_pixels(frames: np.ndarray, image_size: int = 384) -> np.ndarray:
    """RGB uint8 frames [N, H, W, 3] -> float32 [N, image_size, image_size, 3] in [-1, 1].

    Equal to SiglipImageProcessor: resize bicubic (Pillow-exact), rescale 1/255, normalise 0.5/0.5.
    """
    return siglip_normalize(siglip_resize(frames, image_size))


# ---------------------------------------------------------------- Whisper log-mel ----

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
CHUNK_SECONDS = 30
CHUNK_SAMPLES = CHUNK_SECONDS * SAMPLE_RATE        # 480000
CHUNK_FRAMES = CHUNK_SAMPLES // HOP_LENGTH         # 3000


def _hz_to_mel(freq: np.ndarray) -> np.ndarray:
    """Slaney mel scale: linear below 1 kHz, logarithmic above."""
    freq = np.asarray(freq, np.float64)
    min_log_hz, min_log_mel, logstep = 1000.0, 15.0, 27.0 / np.log(6.4)
    mels = 3.0 * freq / 200.0
    log_part = min_log_mel + np.log(np.maximum(freq, 1e-10) / min_log_hz) * logstep
    return np.where(freq >= min_log_hz, log_part, mels)


def _mel_to_hz(mels: np.ndarray) -> np.ndarray:
    mels = np.asarray(mels, np.float64)
    min_log_hz, min_log_mel, logstep = 1000.0, 15.0, np.log(6.4) / 27.0
    freq = 200.0 * mels / 3.0
    return np.where(mels >= min_log_mel, min_log_hz * np.exp(logstep * (mels - min_log_mel)), freq)


@functools.lru_cache(maxsize=8)
def mel_filters(num_mel_bins: int, sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT) -> np.ndarray:
    """Slaney-normalised triangular filters [n_fft // 2 + 1, num_mel_bins] (Whisper's filter bank)."""
    fft_freqs = np.linspace(0, sample_rate // 2, n_fft // 2 + 1)
    mel_points = np.linspace(_hz_to_mel(0.0), _hz_to_mel(sample_rate / 2), num_mel_bins + 2)
    hz_points = _mel_to_hz(mel_points)
    diffs = np.diff(hz_points)
    slopes = hz_points[None, :] - fft_freqs[:, None]                     # [freqs, mels + 2]
    down = -slopes[:, :-2] / diffs[:-1]
    up = slopes[:, 2:] / diffs[1:]
    filters = np.maximum(0.0, np.minimum(down, up))
    filters *= 2.0 / (hz_points[2:] - hz_points[:-2])                   # slaney area norm
    filters.setflags(write=False)
    return filters


@functools.lru_cache(maxsize=2)
def _hann(n_fft: int) -> np.ndarray:
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n_fft) / n_fft)   # periodic
    window.setflags(write=False)
    return window


def log_mel(audio: np.ndarray, num_mel_bins: int = 128) -> np.ndarray:
    """16-kHz mono float audio (at most 30 s) -> float32 [num_mel_bins, 3000] Whisper log-mel.

    As `WhisperFeatureExtractor`: zero-pad to 30 s, centred reflect-padded STFT (n_fft 400,
    hop 160, periodic Hann), power spectrum, slaney mel, log10 clamped at 1e-10, floor at
    max - 8, then (x + 4) / 4. The last STFT frame is dropped (3001 -> 3000).
    """
    audio = np.asarray(audio, np.float32)
    if audio.ndim != 1:
        raise ValueError(f"log_mel expects mono audio [samples], got shape {audio.shape}")
    if audio.shape[0] > CHUNK_SAMPLES:
        raise ValueError(f"log_mel takes at most {CHUNK_SAMPLES} samples (30 s), got "
                         f"{audio.shape[0]}; split with log_mel_chunks")
    padded = np.zeros(CHUNK_SAMPLES, np.float64)
    padded[: audio.shape[0]] = audio
    half = N_FFT // 2
    padded = np.pad(padded, (half, half), mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP_LENGTH]
    frames = frames[:CHUNK_FRAMES]                                     # [3000, 400]
    spectrum = np.fft.rfft(frames * _hann(N_FFT), axis=-1)             # [3000, 201]
    power = spectrum.real ** 2 + spectrum.imag ** 2
    mel = power @ mel_filters(num_mel_bins)                            # [3000, bins]
    log_spec = np.log10(np.maximum(mel, 1e-10))
    log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
    return ((log_spec + 4.0) / 4.0).T.astype(np.float32)               # [bins, 3000]


def num_chunks(num_samples: int) -> int:
    """Number of 30-s chunks for `num_samples` (at least one)."""
    return max(1, -(-int(num_samples) // CHUNK_SAMPLES))


def log_mel_chunks(audio: np.ndarray, num_mel_bins: int = 128) -> np.ndarray:
    """Audio of any length -> float32 [chunks, num_mel_bins, 3000], one log-mel per 30-s chunk."""
    audio = np.asarray(audio, np.float32)
    count = num_chunks(audio.shape[0])
    return np.stack([log_mel(audio[i * CHUNK_SAMPLES:(i + 1) * CHUNK_SAMPLES], num_mel_bins)
                     for i in range(count)])
