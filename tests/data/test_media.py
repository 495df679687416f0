"""Decoding: frame sampling (1 fps, <= 110 frames), audio to 16 kHz mono, and every failure's behaviour."""

import numpy as np
import pytest

from vsalmonn_jax.data.media import MediaError, load_audio, load_media, sample_times


def _peak_hz(audio: np.ndarray, rate: int = 16000) -> float:
    spectrum = np.abs(np.fft.rfft(audio[:rate]))
    return float(np.argmax(spectrum) * rate / rate)


def test_5fps_30s_clip_gives_30_frames_at_whole_seconds(media_dir):
    media = load_media(str(media_dir / "fps5_30s.mp4"))
    assert media.frames.shape == (30, 32, 32, 3) and media.frames.dtype == np.uint8
    np.testing.assert_allclose(media.frame_times, np.arange(30), atol=1e-6)
    # the red channel encodes the source frame index (8 * i): frame k is source frame 5k
    red = media.frames[:, :, :, 0].astype(float).mean(axis=(1, 2))
    expected = (8 * 5 * np.arange(30)) % 256
    assert np.abs(red - expected).max() < 12


def test_200s_clip_gives_110_evenly_spread_frames(media_dir):
    media = load_media(str(media_dir / "fps1_200s.mp4"))
    assert media.frames.shape[0] == 110
    times = media.frame_times
    assert times[0] == 0 and times[-1] == 199 and np.all(np.diff(times) > 0)
    np.testing.assert_allclose(times, np.floor(np.linspace(0, 199, 110)), atol=1e-6)


def test_sample_times_rules():
    np.testing.assert_allclose(sample_times(4.0), [0, 1, 2, 3])
    np.testing.assert_allclose(sample_times(4.5), [0, 1, 2, 3, 4])
    np.testing.assert_allclose(sample_times(0.4), [0])
    assert len(sample_times(1000.0, max_frames=110)) == 110
    np.testing.assert_allclose(sample_times(10.0, fps=2.0)[:3], [0, 0.5, 1.0])


def test_48k_stereo_track_becomes_16k_mono_channel_0(media_dir):
    media = load_media(str(media_dir / "fps5_30s.mp4"))
    assert media.audio.dtype == np.float32 and media.audio.shape == (480000,)
    assert media.audio_seconds == pytest.approx(30.0, abs=1e-3) and media.has_audio
    assert _peak_hz(media.audio[16000:32000]) == pytest.approx(440, abs=2)   # left channel
    mixed = load_audio(str(media_dir / "fps5_30s.mp4"), channel="mean")
    spectrum = np.abs(np.fft.rfft(mixed[16000:32000]))
    assert spectrum[1000] > 0.05 * spectrum[440]                            # right channel mixed in
    first = np.abs(np.fft.rfft(media.audio[16000:32000]))
    assert first[1000] < 0.01 * first[440]


@pytest.mark.parametrize("name,rate,seconds,hz", [("stereo48k.wav", 48000, 2.0, 440),
                                                   ("tone.flac", 44100, 1.5, 500),
                                                   ("tone.mp3", 44100, 1.5, 500)])
def test_separate_audio_files(media_dir, name, rate, seconds, hz):
    audio = load_audio(str(media_dir / name))
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(audio.shape[0] - seconds * 16000) <= 0.03 * 16000           # mp3 adds a little
    assert _peak_hz(audio) == pytest.approx(hz, abs=2)
    media = load_media(audio=str(media_dir / name))
    assert media.has_audio and not media.has_video and media.frames.shape[0] == 0


def test_video_plus_separate_audio_uses_the_audio_file(media_dir):
    media = load_media(str(media_dir / "fps1_200s.mp4"), str(media_dir / "tone.flac"))
    assert media.has_video and media.has_audio and media.frames.shape[0] == 110
    assert media.audio_seconds == pytest.approx(1.5, abs=0.01)


def test_video_without_audio_track_silence_or_error(media_dir):
    media = load_media(str(media_dir / "fps1_200s.mp4"), missing_audio="silence")
    assert not media.has_audio and media.audio.shape == (200 * 16000,)
    assert not media.audio.any()
    with pytest.raises(MediaError) as err:
        load_media(str(media_dir / "fps1_200s.mp4"), missing_audio="error")
    assert err.value.reason == "no_audio" and "fps1_200s.mp4" in str(err.value)


def test_release_records_take_sound_from_their_audio_field_only(media_dir, capsys):
    """data.video_audio=record (the release's loader: the modality is the record's keys): a video
    record without "audio" is visual-only whatever its file holds; "audio" naming the video file
    itself is its own track (files named to `caption`), a missing track then follows missing_audio."""
    import vsalmonn_jax.data.media as media_lib

    clip = str(media_dir / "fps5_30s.mp4")                                  # has a 440 Hz track
    media_lib._UNUSED_TRACK_NOTED = False
    silent = load_media(clip, video_audio="record")
    assert silent.has_video and not silent.has_audio and not silent.audio.any()
    assert "fps5_30s.mp4 has an audio track that is not used" in capsys.readouterr().err
    load_media(clip, video_audio="record")
    assert capsys.readouterr().err == ""                                    # said once
    assert silent.audio.shape == (480000,)                                  # silence of its length
    own = load_media(clip, clip, video_audio="record")
    np.testing.assert_array_equal(own.audio, load_media(clip).audio)
    assert own.has_audio
    assert not load_media(str(media_dir / "fps1_200s.mp4"), str(media_dir / "fps1_200s.mp4"),
                          video_audio="record").has_audio                   # no track: silence
    with pytest.raises(ValueError, match="video_audio must be one of"):
        load_media(clip, video_audio="file")


@pytest.mark.parametrize("name,reason", [
    ("truncated.mp4", "undecodable"),            # index (moov) lost with the tail
    ("truncated_faststart.mp4", "truncated"),    # opens, frames stop half-way
    ("zero.mp4", "empty"),
    ("text.mp4", "undecodable"),
    ("missing.mp4", "missing"),
])
def test_broken_files_raise_media_error_with_reason(media_dir, name, reason):
    with pytest.raises(MediaError) as err:
        load_media(str(media_dir / name))
    assert err.value.reason == reason
    assert name in str(err.value)


def test_short_clip_audio_padded_to_one_second(media_dir):
    media = load_media(str(media_dir / "short.mp4"))
    assert media.frames.shape[0] == 1                    # 0.6 s -> one frame at t = 0
    assert media.audio.shape == (16000,)
    assert media.audio_seconds == pytest.approx(0.6, abs=0.01)
    assert not media.audio[int(0.61 * 16000):].any()


def test_randomly_damaged_files_fail_only_with_media_error(synth_dir, tmp_path):
    """20 copies of a clip with 20 random bytes overwritten each: every one either decodes or
    raises MediaError (the loader can quarantine it); no other exception escapes."""
    data = (synth_dir / "media/train/train_000003.mp4").read_bytes()
    outcomes = []
    for seed in range(20):
        rng = np.random.default_rng(seed)
        damaged = bytearray(data)
        for pos in rng.integers(0, len(damaged), 20):
            damaged[pos] = int(rng.integers(0, 256))
        path = tmp_path / f"damaged{seed}.mp4"
        path.write_bytes(bytes(damaged))
        try:
            load_media(str(path))
            outcomes.append("ok")
        except MediaError as err:
            outcomes.append(err.reason)
    assert len(outcomes) == 20 and set(outcomes) - {"ok"}


def _frame_index(frames: np.ndarray) -> np.ndarray:
    return np.round(frames[..., 0].astype(float).mean(axis=(1, 2)) / 20).astype(int)


def test_file_sampling_spaces_frames_over_all_frame_indices(format_clips):
    """Above max_frames (6 grid frames > 4), the release takes linspace(0, 11, 4) -> frames
    0, 3, 7, 11 of the file; the grid form takes grid frames 0, 1, 3, 5 (file frames 0, 2, 6, 10)."""
    from vsalmonn_jax.data.media import file_frame_indices

    path = str(format_clips / "fps2_12frames.mp4")
    np.testing.assert_array_equal(file_frame_indices(12, 4), np.linspace(0, 11, 4).astype(int))
    media = load_media(path, max_frames=4, frame_sampling="file")
    np.testing.assert_array_equal(_frame_index(media.frames), [0, 3, 7, 11])
    np.testing.assert_allclose(media.frame_times, np.array([0, 3, 7, 11]) / 2, atol=1e-6)
    grid = load_media(path, max_frames=4)
    np.testing.assert_array_equal(_frame_index(grid.frames), [0, 2, 6, 10])
    below = load_media(path, max_frames=6, frame_sampling="file")     # not above: the 1-fps grid
    np.testing.assert_array_equal(_frame_index(below.frames), [0, 2, 4, 6, 8, 10])
    with pytest.raises(ValueError, match="frame_sampling must be one of"):
        load_media(path, max_frames=4, frame_sampling="linspace")


def test_file_sampling_steps_frames_as_the_release_below_max_frames(tmp_path):
    """The release steps round(file fps / fps) frames (Python rounding) at any length: 12 frames
    at 2.5 fps take frames 0, 2, .., 10 (6 frames for a 4.8-s clip); the 1-fps grid takes 5."""
    from vsalmonn_jax.data.encode import write_video
    from vsalmonn_jax.data.media import release_frame_indices

    frames = np.zeros((12, 16, 16, 3), np.uint8)
    frames[..., 0] = (20 * np.arange(12, dtype=np.uint8))[:, None, None]
    path = str(tmp_path / "fps2.5.mp4")
    write_video(path, frames, fps=2.5)
    media = load_media(path, max_frames=110, frame_sampling="file")
    np.testing.assert_array_equal(_frame_index(media.frames), [0, 2, 4, 6, 8, 10])
    np.testing.assert_allclose(media.frame_times, np.arange(0, 12, 2) / 2.5, atol=1e-6)
    assert load_media(path, max_frames=110).frames.shape[0] == 5          # the grid form
    np.testing.assert_array_equal(release_frame_indices(100, 12.5, 1.0, 110), np.arange(0, 100, 12))
    np.testing.assert_array_equal(release_frame_indices(100, 12.5, 1.0, 4), [0, 33, 66, 99])


def test_audio_cut_to_the_video_duration_gives_one_chunk(format_clips):
    from vsalmonn_jax.data.features import log_mel_chunks

    path = str(format_clips / "v30_a31.mp4")
    cut = load_media(path, audio_cut="video")
    assert cut.video_seconds == pytest.approx(30.0, abs=1e-3)
    assert cut.audio.shape == (480000,) and cut.audio_seconds == pytest.approx(30.0, abs=1e-3)
    assert log_mel_chunks(cut.audio, 16).shape[0] == 1
    whole = load_media(path)                                          # the clean form: whole track
    assert whole.audio_seconds == pytest.approx(31.0, abs=0.05)
    assert log_mel_chunks(whole.audio, 16).shape[0] == 2
    with pytest.raises(ValueError, match="audio_cut must be one of"):
        load_media(path, audio_cut="yes")
    # an audio-only record: the release cuts it to max_time = max_frames / fps (here 20 s)
    audio_only = load_media(audio=path, audio_cut="video", max_frames=10, fps=0.5)
    assert audio_only.audio.shape == (320000,) and not audio_only.has_video
    assert load_media(audio=path, max_frames=10, fps=0.5).audio_seconds == pytest.approx(31.0, abs=0.05)
