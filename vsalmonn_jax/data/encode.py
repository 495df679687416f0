"""Writing media with PyAV: .mp4 (H.264 + AAC) from frame and sample arrays, and audio-only files.

Used by the synthetic data set and by the tests to make real media files to decode.
"""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np

LAYOUTS = {1: "mono", 2: "stereo", 6: "5.1"}         # channels -> FFmpeg layout


def _write_audio(container, stream, audio: np.ndarray, sample_rate: int) -> None:
    """Encode float audio [samples] or [samples, channels] in the encoder's frame size."""
    audio = np.asarray(audio, np.float32)
    if audio.ndim == 1:
        audio = audio[:, None]
    layout = LAYOUTS[audio.shape[1]]
    planar = np.ascontiguousarray(audio.T)                         # [channels, samples]
    step = stream.codec_context.frame_size or 1024
    for start in range(0, planar.shape[1], step):
        chunk = np.ascontiguousarray(planar[:, start:start + step])
        frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=layout)
        frame.sample_rate = sample_rate
        frame.pts = start
        frame.time_base = Fraction(1, sample_rate)
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode(None):
        container.mux(packet)


def write_video(path: str, frames: np.ndarray, fps: float = 1.0, audio: np.ndarray | None = None,
                sample_rate: int = 16000, codec: str = "h264", faststart: bool = False,
                audio_codec: str = "aac") -> None:
    """uint8 frames [N, H, W, 3] (H, W even) at `fps`, optional audio [samples(, channels)] -> file
    (the container from the extension: .mp4 / .mov / .mkv; .webm needs codec="libvpx",
    audio_codec="libopus" at 48 kHz).

    `faststart` puts the index (moov atom) first, so a truncated file still opens.
    """
    frames = np.asarray(frames, np.uint8)
    rate = Fraction(fps).limit_denominator(1000)
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), mode="w", options=options) as container:
        video = container.add_stream(codec, rate=rate)
        video.width, video.height = frames.shape[2], frames.shape[1]
        video.pix_fmt = "yuv420p"
        if codec == "h264":
            video.options = {"crf": "18", "preset": "ultrafast", "tune": "zerolatency"}
        astream = None
        if audio is not None:
            channels = 1 if np.ndim(audio) == 1 else np.shape(audio)[1]
            astream = container.add_stream(audio_codec, rate=sample_rate, layout=LAYOUTS[channels])
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = i
            frame.time_base = 1 / rate
            for packet in video.encode(frame):
                container.mux(packet)
        for packet in video.encode(None):
            container.mux(packet)
        if astream is not None:
            _write_audio(container, astream, audio, sample_rate)


def write_audio(path: str, audio: np.ndarray, sample_rate: int = 16000) -> None:
    """Float audio [samples(, channels)] -> .wav (pcm_s16le), .flac or .mp3 by extension."""
    codec = {"wav": "pcm_s16le", "flac": "flac", "mp3": "libmp3lame"}[str(path).rsplit(".", 1)[-1]]
    audio = np.asarray(audio, np.float32)
    channels = 1 if audio.ndim == 1 else audio.shape[1]
    layout = "mono" if channels == 1 else "stereo"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=sample_rate, layout=layout)
        if codec == "pcm_s16le":
            pcm = np.clip(np.round(audio.reshape(-1, channels) * 32767), -32768, 32767)
            frame = av.AudioFrame.from_ndarray(pcm.astype(np.int16).reshape(1, -1), format="s16",
                                               layout=layout)
            frame.sample_rate, frame.pts = sample_rate, 0
            frame.time_base = Fraction(1, sample_rate)
            for packet in stream.encode(frame):
                container.mux(packet)
            for packet in stream.encode(None):
                container.mux(packet)
        else:
            _write_audio(container, stream, audio, sample_rate)
