"""Media decoding with PyAV: video frames at 1 fps (at most 110, evenly resampled) and 16-kHz mono audio.

Every failure (missing, empty, truncated, undecodable file, no audio track in `error` mode) raises
`MediaError` with a reason; the pipeline quarantines the record and keeps going.
"""

from __future__ import annotations

import dataclasses
import os

import av
import numpy as np
import soxr

# what damaged streams raise from inside the decoder / converters (never a bug of ours)
_DECODE_ERRORS = (av.FFmpegError, OSError, EOFError, ValueError, AttributeError)
AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".m4a", ".aac", ".opus")


class MediaError(Exception):
    """A media file that cannot be used; `reason` is a short machine-friendly cause."""

    def __init__(self, path: str, reason: str, detail: str = ""):
        self.path, self.reason, self.detail = str(path), reason, detail
        super().__init__(f"{path}: {reason}" + (f" ({detail})" if detail else ""))


@dataclasses.dataclass
class Media:
    """Decoded media of one record. Absent parts are empty arrays with the flag False."""

    frames: np.ndarray          # uint8 [F, H, W, 3]
    frame_times: np.ndarray     # float32 [F] seconds
    audio: np.ndarray           # float32 [samples] 16 kHz mono, padded to the minimum length
    audio_seconds: float        # true audio length before padding
    has_video: bool
    has_audio: bool
    video_seconds: float = 0.0  # the video's duration (0 without video)


FRAME_SAMPLING = ("grid", "file")
AUDIO_CUTS = ("none", "video")


def grid_count(duration: float, fps: float = 1.0) -> int:
    """Frames on the 1/fps grid within [0, duration) (at least 1)."""
    return max(1, int(np.ceil(duration * fps - 1e-6))) if duration > 0 else 1


def sample_times(duration: float, fps: float = 1.0, max_frames: int = 110) -> np.ndarray:
    """Target frame times: every 1/fps s within [0, duration); past `max_frames`, evenly resampled."""
    if duration <= 0:
        return np.zeros((1,), np.float64)
    count = grid_count(duration, fps)
    times = np.arange(count, dtype=np.float64) / fps
    if count > max_frames:
        picks = np.linspace(0, count - 1, max_frames).astype(np.int64)
        times = times[picks]
    return times


def file_frame_indices(total_frames: int, max_frames: int) -> np.ndarray:
    """The release's sampling above max_frames: `max_frames` indices spaced evenly (linspace,
    truncated to int) over ALL frame indices 0..total_frames-1 of the file."""
    return np.linspace(0, total_frames - 1, max_frames).astype(np.int64)


def _packet_times(path: str) -> np.ndarray:
    """Presentation times (s from the stream start, sorted) of every frame of the first video
    stream, read from the packets without decoding: frame index -> time."""
    with _open(path) as container:
        stream = container.streams.video[0]
        start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
        try:
            pts = [float(p.pts * stream.time_base) - start for p in container.demux(stream)
                   if p.pts is not None and p.size]
        except _DECODE_ERRORS as err:
            raise MediaError(path, "corrupt", f"demuxing the video packets failed: {err}") from err
    return np.sort(np.asarray(pts, np.float64))


def target_times(path: str, duration: float, fps: float, max_frames: int,
                 sampling: str = "grid") -> np.ndarray:
    """Frame times to decode: the 1/fps grid; above max_frames, `sampling` "grid" spaces them over
    the grid (sample_times), "file" over all frame indices of the file (file_frame_indices)."""
    if sampling not in FRAME_SAMPLING:
        raise ValueError(f"data.frame_sampling must be one of {FRAME_SAMPLING}, got {sampling!r}")
    if sampling == "grid" or grid_count(duration, fps) <= max_frames:
        return sample_times(duration, fps, max_frames)
    times = _packet_times(path)
    if times.shape[0] <= max_frames:
        return times
    return times[file_frame_indices(times.shape[0], max_frames)]


def cut_audio(wave: np.ndarray, video_seconds: float, sample_rate: int, mode: str) -> np.ndarray:
    """`mode` "video": a video record's audio cut to the video's duration (the release's data
    loader: audio[:round(sr * real_time)]); "none": the whole track."""
    if mode not in AUDIO_CUTS:
        raise ValueError(f"data.audio_cut must be one of {AUDIO_CUTS}, got {mode!r}")
    if mode == "none" or video_seconds <= 0:
        return wave
    return wave[: int(round(video_seconds * sample_rate))]


def _check_file(path: str) -> None:
    if not os.path.exists(path):
        raise MediaError(path, "missing", "file not found")
    if os.path.getsize(path) == 0:
        raise MediaError(path, "empty", "zero-byte file")


def _open(path: str):
    _check_file(path)
    try:
        return av.open(path)
    except (av.FFmpegError, OSError, UnicodeDecodeError) as err:
        raise MediaError(path, "undecodable", f"cannot open container: {err}") from err


def _stream_seconds(stream, container) -> float:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1e6
    return 0.0


def _decode_frames(path: str, container, fps: float, max_frames: int,
                   sampling: str = "grid") -> tuple[np.ndarray, np.ndarray]:
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    duration = _stream_seconds(stream, container)
    rate = float(stream.average_rate) if stream.average_rate else 0.0
    start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
    targets = target_times(path, duration, fps, max_frames, sampling)
    tolerance = 0.5 / rate if rate > 0 else 1e-3
    frames, times, next_target = [], [], 0
    try:
        for frame in container.decode(stream):
            if next_target >= len(targets):
                break
            t = (float(frame.pts * stream.time_base) - start) if frame.pts is not None \
                else len(times) / max(rate, 1e-6)
            if t + tolerance < targets[next_target]:
                continue
            if frames and (frame.width, frame.height) != (frames[0].shape[1], frames[0].shape[0]):
                frame = frame.reformat(width=frames[0].shape[1], height=frames[0].shape[0])
            frames.append(frame.to_ndarray(format="rgb24"))   # a mid-stream size change is rescaled
            times.append(t)
            while next_target < len(targets) and targets[next_target] <= t + tolerance:
                next_target += 1
    except _DECODE_ERRORS as err:
        raise MediaError(path, "corrupt", f"video decode failed after {len(frames)} frames: {err}") from err
    if not frames:
        raise MediaError(path, "no_frames", "no video frame could be decoded")
    if duration > 0 and next_target < len(targets):
        raise MediaError(path, "truncated", f"frames end at {times[-1]:.2f} s of {duration:.2f} s")
    return np.stack(frames), np.asarray(times, np.float32)


def _decode_audio(path: str, container, sample_rate: int, channel: str) -> np.ndarray:
    stream = container.streams.audio[0]
    chunks, rate = [], 0
    try:
        resampler = av.AudioResampler(format="fltp")        # keeps the track's layout and rate
        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray())              # [channels, samples]
                rate = out.sample_rate
        for out in resampler.resample(None):
            chunks.append(out.to_ndarray())
        if not chunks:
            return np.zeros((0,), np.float32)
        wave = np.concatenate(chunks, axis=1)                 # [channels, samples]
    except _DECODE_ERRORS as err:
        raise MediaError(path, "corrupt", f"audio decode failed: {err}") from err
    mono = wave[0] if channel == "first" else wave.mean(axis=0)
    duration = _stream_seconds(stream, container)
    if duration > 0:                                          # AAC pads its last frame
        mono = mono[: int(round(duration * rate))]
    if rate != sample_rate:
        mono = soxr.resample(mono.astype(np.float32), rate, sample_rate, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)


def load_audio(path: str, sample_rate: int = 16000, channel: str = "first") -> np.ndarray:
    """Any audio (or video) file's first audio track -> float32 mono at `sample_rate`."""
    with _open(path) as container:
        if not container.streams.audio:
            raise MediaError(path, "no_audio", "file has no audio track")
        return _decode_audio(path, container, sample_rate, channel)


def load_media(video: str | None = None, audio: str | None = None, *, fps: float = 1.0,
               max_frames: int = 110, sample_rate: int = 16000, min_audio_seconds: float = 1.0,
               missing_audio: str = "silence", channel: str = "first",
               frame_sampling: str = "grid", audio_cut: str = "none") -> Media:
    """Decode one record's media: a video (with its audio track) and/or a separate audio file.

    A video without an audio track: `missing_audio="silence"` gives silence of the video's
    length with `has_audio=False`; `"error"` raises MediaError("no_audio"). A separate audio
    file, when given, is used instead of the video's track. `frame_sampling` (target_times) and
    `audio_cut` (cut_audio) choose the release's forms.
    """
    if video is None and audio is None:
        raise ValueError("load_media needs a video or an audio path")
    frames = np.zeros((0, 1, 1, 3), np.uint8)
    times = np.zeros((0,), np.float32)
    wave, has_audio, duration = None, False, 0.0
    if video is not None:
        with _open(video) as container:
            if not container.streams.video:
                raise MediaError(video, "no_video", "file has no video track")
            frames, times = _decode_frames(video, container, fps, max_frames, frame_sampling)
            duration = _stream_seconds(container.streams.video[0], container)
        if audio is None:
            with _open(video) as container:
                if container.streams.audio:
                    wave, has_audio = _decode_audio(video, container, sample_rate, channel), True
                elif missing_audio == "error":
                    raise MediaError(video, "no_audio", "video has no audio track")
                elif missing_audio != "silence":
                    raise ValueError(f"data.missing_audio must be 'silence' or 'error', "
                                     f"got {missing_audio!r}")
    if audio is not None:
        wave, has_audio = load_audio(audio, sample_rate, channel), True
        if wave.shape[0] == 0:
            raise MediaError(audio, "no_samples", "audio track decodes to zero samples")
    if wave is None:
        wave = np.zeros((int(round(duration * sample_rate)),), np.float32)
    wave = cut_audio(wave, duration, sample_rate, audio_cut)
    seconds = wave.shape[0] / sample_rate
    minimum = int(np.ceil(min_audio_seconds * sample_rate))
    if wave.shape[0] < minimum:
        wave = np.pad(wave, (0, minimum - wave.shape[0]))
    return Media(frames=frames, frame_times=times, audio=wave, audio_seconds=float(seconds),
                 has_video=video is not None, has_audio=has_audio, video_seconds=float(duration))
