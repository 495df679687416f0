"""Model input features in numpy/jax: SigLIP pixels (Pillow-exact bicubic) and Whisper log-mel chunks.

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
def resample_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's `precompute_coeffs` for 8-bit images: (first input index int32 [out_size],
    fixed-point weights int32 [out_size, K]).

    Pillow normalises each output's taps to sum 1 in float64 and rounds them to 22-bit fixed
    point, half away from zero; unused trailing taps are 0.
    """
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    ksize = int(np.ceil(support)) * 2 + 1
    starts = np.zeros(out_size, np.int32)
    weights = np.zeros((out_size, ksize), np.int32)
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
        starts[out], weights[out, : hi - lo] = lo, np.trunc(fixed)
    starts.setflags(write=False)
    weights.setflags(write=False)
    return starts, weights


def _cpu_jax():
    """jax and this process's CPU device (grain workers restrict jax to the CPU platform at
    start-up). A local one: in a multi-process CPU run jax.devices("cpu")[0] is process 0's, and
    every other process's resize raised."""
    import jax

    try:
        return jax, jax.local_devices(backend="cpu")[0]
    except RuntimeError:   # JAX_PLATFORMS without cpu: the default device does it
        return jax, jax.local_devices()[0]


def _resample_axis(jnp, x, axis: int, in_size: int, out_size: int):
    """One Pillow pass along `axis` of int32 x: sum_k x[start + k] * w_k, then `clip8`."""
    starts, weights = resample_taps(in_size, out_size)
    shape = [1] * x.ndim
    shape[axis] = out_size
    acc = jnp.int32(1 << (_PRECISION_BITS - 1))
    for k in range(weights.shape[1]):
        index = np.minimum(starts + k, in_size - 1)        # weight 0 wherever this clamps
        acc = acc + jnp.take(x, index, axis=axis) * weights[:, k].reshape(shape)
    return jnp.clip(acc >> _PRECISION_BITS, 0, 255)


@functools.lru_cache(maxsize=32)
def _resize_fn(in_h: int, in_w: int, height: int, width: int):
    jax, _ = _cpu_jax()
    jnp = jax.numpy

    def resize(frames):                                    # uint8 [n, in_h, in_w, C]
        x = frames.astype(jnp.int32)
        if in_w != width:
            x = _resample_axis(jnp, x, 2, in_w, width)     # horizontal first, as Pillow
        if in_h != height:
            x = _resample_axis(jnp, x, 1, in_h, height)
        return x.astype(jnp.uint8)

    return jax.jit(resize)


RESIZE_CHUNK = 8   # frames per jitted call: one compiled shape per source resolution


def resize_bicubic_uint8(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [N, H, W, C] -> uint8 [N, height, width, C], bit-equal to Pillow `BICUBIC`.

    Pillow's fixed-point algorithm in int32 (horizontal pass, round to 8 bits, vertical pass),
    jitted with jax on the CPU in chunks of 8 frames.
    """
    frames = np.asarray(frames, np.uint8)
    n, in_h, in_w, channels = frames.shape
    if n == 0:
        return np.zeros((0, height, width, channels), np.uint8)
    jax, cpu = _cpu_jax()
    fn = _resize_fn(in_h, in_w, height, width)
    out = np.empty((n, height, width, channels), np.uint8)
    for i in range(0, n, RESIZE_CHUNK):
        chunk = frames[i:i + RESIZE_CHUNK]
        count = chunk.shape[0]
        if count < RESIZE_CHUNK:
            chunk = np.concatenate([chunk, np.zeros((RESIZE_CHUNK - count, *chunk.shape[1:]), np.uint8)])
        out[i:i + count] = np.asarray(fn(jax.device_put(chunk, cpu)))[:count]
    return out


def siglip_resize(frames: np.ndarray, image_size: int = 384) -> np.ndarray:
    """RGB uint8 frames [N, H, W, 3] -> uint8 [N, image_size, image_size, 3], Pillow-exact bicubic."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"siglip_pixels expects uint8 frames [N, H, W, 3], got "
                         f"{frames.dtype} {frames.shape}")
    return resize_bicubic_uint8(frames, image_size, image_size)


@functools.lru_cache(maxsize=1)
def _siglip_table() -> np.ndarray:
    """float32 [256]: the processor's rescale (float64, cast) then normalise, per 8-bit value."""
    rescaled = (np.arange(256, dtype=np.float64) * (1.0 / 255.0)).astype(np.float32)
    table = (rescaled - np.float32(_SIGLIP_MEAN)) / np.float32(_SIGLIP_STD)
    table.setflags(write=False)
    return table


def siglip_normalize(pixels: np.ndarray) -> np.ndarray:
    """uint8 pixels [..., 3] -> float32 in [-1, 1]: rescale by 1/255, mean = std = 0.5."""
    return _siglip_table()[np.asarray(pixels, np.uint8)]


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
    half = N_FFT // 2
    # STFT frame k covers samples [160k - 200, 160k + 200) of the zero-padded chunk: frames past
    # the audio are exactly zero (power 0), so only the first `active` frames are computed.
    active = min(CHUNK_FRAMES, -(-(audio.shape[0] + half) // HOP_LENGTH))
    chunk = np.zeros(CHUNK_SAMPLES if active == CHUNK_FRAMES else active * HOP_LENGTH + half,
                     np.float64)
    chunk[: audio.shape[0]] = audio
    if active == CHUNK_FRAMES:   # the end reflection only reaches the last frame
        padded = np.pad(chunk, (half, half), mode="reflect")
    else:
        padded = np.concatenate([chunk[half:0:-1], chunk])             # reflect (start)
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP_LENGTH][:active]
    spectrum = np.fft.rfft(frames * _hann(N_FFT), axis=-1)             # [active, 201]
    power = spectrum.real ** 2 + spectrum.imag ** 2
    mel = np.zeros((CHUNK_FRAMES, num_mel_bins), np.float64)
    mel[:active] = power @ mel_filters(num_mel_bins)                   # [3000, bins]
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
