"""Containers and streams beyond plain MP4: .mkv / .mov remuxes and .webm (whose video stream states
no duration of its own), a VFR stream that outlasts its stated duration, and a 5.1 track."""

import logging
from fractions import Fraction

import av
import numpy as np
import pytest

from vsalmonn_jax.data.encode import write_video
from vsalmonn_jax.data.media import load_media

VFR_TIMES = [0.0, 0.5, 1.0, 1.2, 3.0, 5.5, 7.5, 8.0, 9.9]


def tone(freq: float, seconds: float, rate: int) -> np.ndarray:
    return (0.3 * np.sin(2 * np.pi * freq * np.arange(int(seconds * rate)) / rate)).astype(np.float32)


def moving_frames(count: int) -> np.ndarray:
    """[count, 32, 32, 3] frames whose red channel is 8 * index (the index survives lossy codecs)."""
    frames = np.random.default_rng(0).integers(0, 60, (count, 32, 32, 3), dtype=np.uint8)
    frames[..., 0] = (8 * np.arange(count, dtype=np.uint8))[:, None, None]
    return frames


def _remux(src, dst):
    """Stream copy (no re-encoding) into another container, as `ffmpeg -c copy` does."""
    with av.open(str(src)) as source, av.open(str(dst), "w") as target:
        streams = {s.index: target.add_stream_from_template(s) for s in source.streams}
        for packet in source.demux():
            if packet.dts is None:
                continue
            packet.stream = streams[packet.stream.index]
            target.mux(packet)


def _write_vfr(path):
    """H.264 with B-frames at VFR_TIMES (ms time base): MP4 states 8.5 s, its last frame is at 9.9 s."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("h264", rate=30)
        stream.width = stream.height = 32
        stream.pix_fmt, stream.time_base = "yuv420p", Fraction(1, 1000)
        for i, t in enumerate(VFR_TIMES):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 20 * i, np.uint8), format="rgb24")
            frame.pts, frame.time_base = int(round(1000 * t)), Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("containers")
    frames = moving_frames(18)
    # 18 s of video, 18.3 s of audio: the container's duration is the audio's
    write_video(root / "clip.mp4", frames, fps=1, audio=tone(440, 18.3, 16000))
    _remux(root / "clip.mp4", root / "clip.mkv")
    _remux(root / "clip.mp4", root / "clip.mov")
    write_video(root / "clip.webm", frames, fps=1, codec="libvpx", audio_codec="libopus",
                audio=tone(440, 18.3, 48000), sample_rate=48000)
    _write_vfr(root / "vfr.mp4")
    surround = np.zeros((int(3 * 48000), 6), np.float32)       # FL FR FC LFE BL BR
    surround[:, 2] = tone(300, 3, 48000)                       # sound only in the centre
    write_video(root / "centre51.mp4", moving_frames(3), fps=1, audio=surround,
                sample_rate=48000)
    return root


def _red(media) -> np.ndarray:
    return media.frames[:, :, :, 0].astype(float).mean(axis=(1, 2))


@pytest.mark.parametrize("name", ["clip.mp4", "clip.mkv", "clip.mov", "clip.webm"])
def test_every_frame_of_each_container_decodes(files, name):
    """Was `truncated (frames end at 17.06 s of 18.36 s)` for the mkv / webm: the container's duration
    (a longer audio track) stood in for the video stream's."""
    media = load_media(str(files / name))
    assert media.frames.shape == (18, 32, 32, 3)
    np.testing.assert_allclose(media.frame_times - media.frame_times[0], np.arange(18), atol=1e-3)
    assert media.frame_times[0] < 0.1
    assert np.abs(_red(media) - 8 * np.arange(18)).max() < 12          # frame k is source frame k
    assert media.has_audio and 18.0 < media.audio_seconds < 18.5


def test_vfr_stream_past_its_stated_duration_keeps_every_frame(files):
    with av.open(str(files / "vfr.mp4")) as container:      # the premise: stated 8.5 s < 9.9 s
        stream = container.streams.video[0]
        assert float(stream.duration * stream.time_base) < 9.0
    every = load_media(str(files / "vfr.mp4"), fps=10)        # a grid finer than any gap
    np.testing.assert_allclose(every.frame_times, VFR_TIMES, atol=1e-3)
    assert np.abs(_red(every) - 20 * np.arange(len(VFR_TIMES))).max() < 12
    one_fps = load_media(str(files / "vfr.mp4"))              # 1 fps still reaches the last frame
    np.testing.assert_allclose(one_fps.frame_times, [0, 1, 3, 5.5, 7.5, 8, 9.9], atol=1e-3)


def test_centre_only_51_track_warns_under_first_and_dialogue_keeps_it(files, caplog):
    path = str(files / "centre51.mp4")
    with caplog.at_level(logging.WARNING, logger="vsalmonn_jax.data.media"):
        first = load_media(path, channel="first")
    assert first.has_audio and np.abs(first.audio).max() < 1e-3             # channel 0 (FL): silence
    assert "audio channel 0 (FL) is silent while channel(s) FC carry sound" in caplog.text
    assert "set data.audio_channel=dialogue" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vsalmonn_jax.data.media"):
        dialogue = load_media(path, channel="dialogue")
    assert not caplog.records
    rms = float(np.sqrt(np.mean(dialogue.audio[1600:-1600] ** 2)))
    assert abs(rms - 0.3 / np.sqrt(2)) < 0.03                                # the centre at full level
    spectrum = np.abs(np.fft.rfft(dialogue.audio[:16000]))
    assert abs(int(np.argmax(spectrum)) - 300) <= 2                          # its 300 Hz tone
    mean = load_media(path, channel="mean")
    np.testing.assert_allclose(mean.audio, dialogue.audio / 6, atol=2e-3)    # 1 of 6 channels
    with pytest.raises(ValueError, match="data.audio_channel must be one of"):
        load_media(path, channel="left")
