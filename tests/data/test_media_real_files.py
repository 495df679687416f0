"""Files real users have that our synthetic clips are not: a phone's portrait video (a display
matrix rotates it), a recording whose last frame is held for seconds, and audio whose container
states only FFmpeg's bitrate estimate of its duration (raw .aac, .mp3 without a Xing header)."""

import struct
from fractions import Fraction

import av
import numpy as np
import pytest

from vsalmonn_jax.data.encode import write_video
from vsalmonn_jax.data.media import load_audio, load_media, upright


def _rotate_mp4(src, dst, matrix):
    """Copy an MP4 with its video track header's display matrix replaced (what a phone writes for a
    portrait recording: the pixels are stored landscape, the matrix turns them)."""
    data = bytearray(open(src, "rb").read())
    at = data.find(b"tkhd")
    version = data[at + 4]
    offset = at + 8 + (8 + 8 + 4 + 4 + 8 if version == 1 else 4 + 4 + 4 + 4 + 4) + 8 + 2 + 2 + 2 + 2
    data[offset:offset + 36] = struct.pack(">9I", *[v & 0xFFFFFFFF for v in matrix])
    open(dst, "wb").write(data)


def test_a_portrait_phone_video_is_decoded_upright(tmp_path):
    """The release's decord turns frames by the display matrix (FFmpeg's transpose); we kept the
    stored landscape pixels: every frame of a portrait video reached the model on its side."""
    frames = np.zeros((3, 32, 64, 3), np.uint8)     # stored 64 wide x 32 high
    frames[:, :, :32] = 255                         # left half white
    write_video(tmp_path / "stored.mp4", frames, fps=1)
    one = 0x10000
    _rotate_mp4(tmp_path / "stored.mp4", tmp_path / "portrait.mp4",
                [0, one, 0, -one, 0, 0, 0, 0, 0x40000000])      # "rotate 90": shown clockwise
    with av.open(str(tmp_path / "portrait.mp4")) as container:
        assert next(container.decode(video=0)).rotation == -90  # the premise
    media = load_media(str(tmp_path / "portrait.mp4"))
    assert media.frames.shape == (3, 64, 32, 3)                 # as displayed: 32 wide x 64 high
    top, bottom = media.frames[:, :24].mean(), media.frames[:, 40:].mean()
    assert top > 200 and bottom < 50                            # the left half turned to the top
    plain = load_media(str(tmp_path / "stored.mp4"))
    assert plain.frames.shape == (3, 32, 64, 3)


def test_upright_turns_by_the_display_angle():
    image = np.arange(6).reshape(2, 3)[..., None]
    np.testing.assert_array_equal(upright(image, -90)[..., 0], [[3, 0], [4, 1], [5, 2]])  # clockwise
    np.testing.assert_array_equal(upright(image, 90)[..., 0], [[2, 5], [1, 4], [0, 3]])
    np.testing.assert_array_equal(upright(image, 180)[..., 0], [[5, 4, 3], [2, 1, 0]])
    assert upright(image, 0) is image


def test_a_held_last_frame_is_not_truncation(tmp_path):
    """51 frames at 10 fps, the last shown for 3 s (a slideshow, a paused screen recording): the
    stream states 8 s and its frames are whole; it was quarantined as truncated at 5.0 of 8.0 s."""
    path = tmp_path / "held.mp4"
    base = Fraction(1, 1000)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("h264", rate=10)
        stream.width = stream.height = 32
        stream.pix_fmt, stream.time_base = "yuv420p", base
        stream.options = {"preset": "ultrafast", "bf": "0"}
        packets = []
        for i, t in enumerate([100 * k for k in range(50)] + [5000]):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 4 * i, np.uint8), format="rgb24")
            frame.pts, frame.time_base = t, base
            packets += list(stream.encode(frame))
        packets += list(stream.encode(None))
        for k, packet in enumerate(packets):
            packet.duration = int((3.0 if k == len(packets) - 1 else 0.1) / packet.time_base)
            container.mux(packet)
    for sampling in ("grid", "file"):
        media = load_media(str(path), frame_sampling=sampling)    # raised MediaError("truncated")
        assert 4.5 <= media.frame_times[-1] <= 5.0 and len(media.frames) >= 5
        assert media.video_seconds == pytest.approx(8.0, abs=0.01)


def _quiet_after_loud(seconds=40, rate=16000):
    rng = np.random.default_rng(0)
    wave = np.zeros(seconds * rate, np.float32)
    wave[: 5 * rate] = 0.5 * rng.standard_normal(5 * rate).clip(-2, 2)       # loud, then a quiet tone
    wave[5 * rate:] = 0.01 * np.sin(2 * np.pi * 440 * np.arange((seconds - 5) * rate) / rate)
    return wave


@pytest.mark.parametrize("name,codec,options,format_options", [
    ("raw.aac", "aac", None, None),
    ("noxing.mp3", "libmp3lame", {"abr": "1", "b": "64k"}, {"write_xing": "0"}),
])
def test_audio_longer_than_its_estimated_duration_is_kept_whole(tmp_path, name, codec, options,
                                                                 format_options):
    """The container's duration of these is FFmpeg's estimate from the first frames' bitrate (a
    third of the track here); the decoded track was cut to it. The release's sf.read keeps it all."""
    path = str(tmp_path / name)
    wave = _quiet_after_loud()
    with av.open(path, "w", options=format_options or {}) as container:
        stream = container.add_stream(codec, rate=16000, layout="mono")
        if options:
            stream.options = options
        step = stream.codec_context.frame_size or 1024
        for k in range(0, len(wave), step):
            frame = av.AudioFrame.from_ndarray(wave[None, k:k + step].copy(), format="fltp",
                                               layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = 16000, k, Fraction(1, 16000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    with av.open(path) as container:                                 # the premise: an estimate
        stream = container.streams.audio[0]
        stated = float(stream.duration * stream.time_base) if stream.duration else \
            container.duration / 1e6
        assert stated < 30
    decoded = load_audio(path, 16000)
    assert 39.9 < decoded.shape[0] / 16000 < 40.3
    assert np.abs(decoded[-16000:]).max() < 0.05 and np.abs(decoded[:16000]).max() > 0.3


def test_an_aac_track_in_mp4_is_still_cut_to_its_stated_length(tmp_path):
    """AAC pads its last frame: within two codec frames the stated duration still trims it."""
    write_video(tmp_path / "clip.mp4", np.zeros((3, 32, 32, 3), np.uint8), fps=1,
                audio=np.full(int(2.7 * 16000), 0.2, np.float32))
    media = load_media(str(tmp_path / "clip.mp4"))
    assert media.audio_seconds == pytest.approx(2.7, abs=0.01)


def test_file_sampling_takes_the_releases_frame_in_a_burst(tmp_path):
    """frame_sampling=file targets the file's own frame times (decord's indices); frames 10 ms apart
    (a VFR burst) fell within the half-frame tolerance, so the frame BEFORE the release's was kept."""
    from vsalmonn_jax.data.media import release_frame_indices

    times = [t + d for t in np.arange(0.0, 6.0, 0.9) for d in (0.0, 0.01, 0.02)]      # bursts of 3
    path, base = tmp_path / "bursts.mp4", Fraction(1, 1000)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("h264", rate=100)   # a 10-ms codec time base
        stream.width = stream.height = 32
        stream.pix_fmt, stream.time_base = "yuv420p", base
        stream.options = {"preset": "ultrafast", "bf": "0"}
        for i, t in enumerate(times):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 10 * i, np.uint8), format="rgb24")
            frame.pts, frame.time_base = int(round(1000 * t)), base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    with av.open(str(path)) as container:
        rate = float(container.streams.video[0].average_rate)
    picks = release_frame_indices(len(times), rate, 1.0, 110)
    assert np.any(np.diff(picks) % 3)                   # the premise: some picks are mid-burst
    media = load_media(str(path), frame_sampling="file")
    np.testing.assert_allclose(media.frame_times, np.asarray(times)[picks], atol=1e-3)
    index = np.round(media.frames[..., 0].astype(float).mean(axis=(1, 2)) / 10).astype(int)
    np.testing.assert_array_equal(index, picks)
