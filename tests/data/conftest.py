"""Real media files for the data tests, written once per session with PyAV (no downloads).

Clips: 5-fps 30-s video with a 48-kHz stereo track, 200-s 1-fps video without audio, a 0.6-s clip,
a larger-frame clip (downsampling path), broken files, a tiny synthetic data set, and the clips of
the release's input-format checks (frame sampling above max_frames, audio longer than the video).
"""

import pathlib

import numpy as np
import pytest

from vsalmonn_jax.data.encode import write_audio, write_video


def tone(freq: float, seconds: float, rate: int, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def moving_frames(count: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Frames whose colour encodes their index (red channel = 8 * index mod 256) plus texture."""
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 60, (count, height, width, 3), dtype=np.uint8)
    for i in range(count):
        frames[i, :, :, 0] = (8 * i) % 256
    return frames


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("media")
    rate = 48000
    stereo = np.stack([tone(440, 30, rate), tone(1000, 30, rate, 0.05)], axis=1)
    write_video(root / "fps5_30s.mp4", moving_frames(150, 32, 32), fps=5, audio=stereo,
                sample_rate=rate)
    write_video(root / "fps1_200s.mp4", moving_frames(200, 16, 16), fps=1)
    write_video(root / "short.mp4", moving_frames(3, 32, 32), fps=5,
                audio=tone(660, 0.6, 16000), sample_rate=16000)
    write_video(root / "large.mp4", moving_frames(2, 480, 640, seed=1), fps=1,
                audio=tone(300, 2.0, 22050), sample_rate=22050)
    write_video(root / "faststart.mp4", moving_frames(40, 64, 64), fps=1, faststart=True)
    write_audio(root / "stereo48k.wav", stereo[: 2 * rate], rate)
    write_audio(root / "tone.flac", tone(500, 1.5, 44100), 44100)
    write_audio(root / "tone.mp3", tone(500, 1.5, 44100), 44100)
    data = (root / "fps5_30s.mp4").read_bytes()
    (root / "truncated.mp4").write_bytes(data[: len(data) // 2])
    fast = (root / "faststart.mp4").read_bytes()
    (root / "truncated_faststart.mp4").write_bytes(fast[: len(fast) // 2])
    (root / "zero.mp4").write_bytes(b"")
    (root / "text.mp4").write_text("this is not a video\n" * 50)
    return root


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> pathlib.Path:
    from vsalmonn_jax.data.synthetic import build_dataset

    root = tmp_path_factory.mktemp("synth")
    build_dataset(str(root), n_train=12, n_val=2, n_test=2, seed=7)
    return root


@pytest.fixture(scope="session")
def format_clips(tmp_path_factory):
    """12 frames at 2 fps (red = 20 * index) and a 30-s video whose AAC track runs 31 s."""
    root = tmp_path_factory.mktemp("format_media")
    frames = np.zeros((12, 16, 16, 3), np.uint8)
    frames[..., 0] = (20 * np.arange(12, dtype=np.uint8))[:, None, None]
    write_video(root / "fps2_12frames.mp4", frames, fps=2)
    t = np.arange(31 * 16000) / 16000
    write_video(root / "v30_a31.mp4", np.zeros((30, 16, 16, 3), np.uint8), fps=1,
                audio=(0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), sample_rate=16000)
    return root
