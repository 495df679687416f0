"""Media decoding with PyAV: video frames at 1 fps (at most 110, evenly resampled) and 16-kHz mono audio.

Every failure (missing, empty, truncated, undecodable file, no audio track in `error` mode) raises
`MediaError` with a reason; the pipeline quarantines the record and keeps going.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys

import av
import numpy as np
import soxr

from vsalmonn_jax.data.features import RESIZE_CHUNK, resize_bicubic_uint8

# what damaged streams raise from inside the decoder / converters (never a bug of ours)
_DECODE_ERRORS = (av.FFmpegError, OSError, EOFError, ValueError, AttributeError)
AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".m4a", ".aac", ".opus")
log = logging.getLogger(__name__)


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
# where a video record's sound comes from: the file's own track when the record names no audio
# ("track") | only the record's "audio" field, as the release (no field: a visual-only record)
VIDEO_AUDIO = ("track", "record")


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


def _packet_times(path: str) -> tuple[np.ndarray, float]:
    """(presentation times (s from the stream start, sorted) of every frame of the first video
    stream, read from the packets without decoding: frame index -> time; the stream's average
    frame rate, 0 if unknown)."""
    with _open(path) as container:
        stream = container.streams.video[0]
        start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
        rate = float(stream.average_rate) if stream.average_rate else 0.0
        try:
            pts = [float(p.pts * stream.time_base) - start for p in container.demux(stream)
                   if p.pts is not None and p.size]
        except _DECODE_ERRORS as err:
            raise MediaError(path, "corrupt", f"demuxing the video packets failed: {err}") from err
    return np.sort(np.asarray(pts, np.float64)), rate


def release_frame_indices(total_frames: int, rate: float, fps: float, max_frames: int) -> np.ndarray:
    """The release's frame indices (llava/dataset/av_dataset.py): every round(rate / fps)-th frame
    of the file (Python's rounding: 12.5 fps at 1 fps steps 12 frames); more than max_frames of
    them: file_frame_indices."""
    step = max(round(rate / fps), 1) if rate > 0 else 1
    picks = np.arange(0, total_frames, step, dtype=np.int64)
    return file_frame_indices(total_frames, max_frames) if picks.shape[0] > max_frames else picks


def target_times(path: str, duration: float, fps: float, max_frames: int,
                 sampling: str = "grid") -> np.ndarray:
    """Frame times to decode. "grid": the 1/fps grid, above max_frames spaced over it
    (sample_times); "file": the release's frame indices of the file (release_frame_indices)."""
    if sampling not in FRAME_SAMPLING:
        raise ValueError(f"data.frame_sampling must be one of {FRAME_SAMPLING}, got {sampling!r}")
    if sampling == "grid":
        return sample_times(duration, fps, max_frames)
    times, rate = _packet_times(path)
    if times.shape[0] == 0:
        return sample_times(duration, fps, max_frames)
    return times[release_frame_indices(times.shape[0], rate, fps, max_frames)]


def cut_audio(wave: np.ndarray, video_seconds: float, sample_rate: int, mode: str,
              max_seconds: float = 0.0) -> np.ndarray:
    """`mode` "video", as the release's data loader (llava/dataset/av_dataset.py): a video record's
    audio cut to the video's duration (audio[:round(sr * real_time)]), an audio-only record's (no
    video duration) to `max_seconds` (audio[:round(sr * max_time)], max_time = data.max_frames /
    data.fps: 110 s); "none": the whole track."""
    if mode not in AUDIO_CUTS:
        raise ValueError(f"data.audio_cut must be one of {AUDIO_CUTS}, got {mode!r}")
    seconds = video_seconds if video_seconds > 0 else max_seconds
    if mode == "none" or seconds <= 0:
        return wave
    return wave[: int(round(seconds * sample_rate))]


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


def _video_seconds(stream) -> float | None:
    """The video stream's own duration: its DURATION tag (Matroska / WebM), else its duration when
    the index counts its frames (MP4 / MOV); None when it states none. Never the container's
    duration, which also covers a longer audio track (and which FFmpeg copies into an mkv stream)."""
    tag = next((v for k, v in stream.metadata.items() if k.upper() == "DURATION"), None)
    if tag:
        try:
            hours, minutes, seconds = tag.split(":")
            return int(hours) * 3600 + int(minutes) * 60 + float(seconds)
        except ValueError:
            pass
    if stream.frames and stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    return None


class _Kept:
    """The picked frames, resized to `size` x `size` (Pillow bicubic, as the featurizer's) in chunks as
    they are decoded: at most one chunk of full-resolution frames is held, not every pick (110
    frames of a 4K video are 2.7 GB). size None: kept as decoded."""

    def __init__(self, size: int | None):
        self.size, self.done, self.pending = size, [], []

    def add(self, frame: np.ndarray) -> None:
        self.pending.append(frame)
        if len(self.pending) == RESIZE_CHUNK:
            self._flush()

    def _flush(self) -> None:
        if self.pending and self.size:
            self.done.extend(resize_bicubic_uint8(np.stack(self.pending), self.size, self.size))
        else:
            self.done.extend(self.pending)
        self.pending = []

    def frames(self) -> list[np.ndarray]:
        self._flush()
        return self.done


def upright(frame: np.ndarray, rotation: float) -> np.ndarray:
    """[H, W, 3] as displayed: `rotation` is the stream's display-matrix angle (PyAV's
    frame.rotation, counter-clockwise degrees; a phone's portrait video: -90), which players and the
    release's decord (FFmpeg's transpose) apply: -90 turns the picture 90 degrees clockwise."""
    turns = int(round(float(rotation or 0) / 90.0)) % 4
    return np.ascontiguousarray(np.rot90(frame, k=turns)) if turns else frame


def _pick_frames(path: str, container, targets: np.ndarray, size: int | None = None,
                 exact: bool = False):
    """Decode EVERY frame of the first video stream; keep the first frame at or after each target
    time (upright, resized to `size` when given); within half a frame interval unless `exact` (the
    targets are the file's own frame times). -> (frames, times, index of the first target each kept
    frame serves, the end of the last frame: its time + its own duration, else 1 / avg rate)."""
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    rate = float(stream.average_rate) if stream.average_rate else 0.0
    start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
    tolerance = 1e-6 if exact else (0.5 / rate if rate > 0 else 1e-3)
    kept, first_size = _Kept(size), None
    times, served, next_target, count, last, end = [], [], 0, 0, 0.0, 0.0
    try:
        for frame in container.decode(stream):           # to the end: a stream may outlast its
            t = (float(frame.pts * stream.time_base) - start) if frame.pts is not None \
                else count / max(rate, 1e-6)              # stated duration (VFR)
            shown = float(frame.duration * stream.time_base) if frame.duration else (
                1.0 / rate if rate > 0 else 0.0)          # a held last frame shows for long
            count, last, end = count + 1, max(last, t), max(end, t + shown)
            if next_target >= len(targets) or t + tolerance < targets[next_target]:
                continue
            first_size = first_size or (frame.width, frame.height)
            if (frame.width, frame.height) != first_size:   # a mid-stream size change is rescaled
                frame = frame.reformat(width=first_size[0], height=first_size[1])
            kept.add(upright(frame.to_ndarray(format="rgb24"), frame.rotation))
            times.append(t)
            served.append(next_target)
            while next_target < len(targets) and targets[next_target] <= t + tolerance:
                next_target += 1
    except _DECODE_ERRORS as err:
        raise MediaError(path, "corrupt", f"video decode failed after {count} frames: {err}") from err
    if not count:
        raise MediaError(path, "no_frames", "no video frame could be decoded")
    return kept.frames(), times, served, last, end


def _decode_frames(path: str, container, fps: float, max_frames: int,
                   sampling: str = "grid", size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Frames at the 1/fps grid up to the last decoded frame (not the stated duration: a VFR stream
    may run past it, an mkv states the container's). Truncated = frames end > 1/fps before the
    video stream's own stated duration. Above max_frames, `sampling` "file" takes the release's
    frame indices over the whole file (target_times) as they are."""
    stream = container.streams.video[0]
    stated = _video_seconds(stream)
    hint = stated or (container.duration / 1e6 if container.duration else 0.0)
    targets = target_times(path, hint, fps, max_frames, sampling)
    frames, times, served, last, end = _pick_frames(path, container, targets, size,
                                                    exact=sampling == "file")
    if stated is not None and stated - end > 1.0 / fps:
        raise MediaError(path, "truncated", f"frames end at {end:.2f} s of {stated:.2f} s")
    if sampling == "file":   # the release's frames of the file, as picked
        return np.stack(frames), np.asarray(times, np.float32)
    wanted = sample_times(last + 1e-3, fps, max_frames)   # every grid time the frames reach
    if len(wanted) <= len(targets) and np.array_equal(wanted, targets[:len(wanted)]):
        keep = [k for k, first in enumerate(served) if first < len(wanted)]
        frames, times = [frames[k] for k in keep], [times[k] for k in keep]
    else:                                                 # the stated duration was wrong: again
        with _open(path) as again:
            frames, times, _, _, _ = _pick_frames(path, again, wanted, size)
    return np.stack(frames), np.asarray(times, np.float32)


CHANNEL_MODES = ("first", "mean", "dialogue")


def _to_mono(path: str, wave: np.ndarray, names: list[str], channel: str) -> np.ndarray:
    """[channels, samples] -> [samples] by `data.audio_channel`: "first" (channel 0, as the official
    release), "mean" (all channels averaged) or "dialogue" (the centre channel "FC" of a 5.1 / 7.1
    track, where films mix speech; the mean when there is none). "first" warns when channel 0 is
    silent while another channel carries sound (e.g. a 5.1 track with sound only in the centre)."""
    if channel == "mean":
        return wave.mean(axis=0)
    if channel == "dialogue":
        return wave[names.index("FC")] if "FC" in names else wave.mean(axis=0)
    if channel != "first":
        raise ValueError(f"data.audio_channel must be one of {CHANNEL_MODES}, got {channel!r}")
    peaks = np.abs(wave).max(axis=1) if wave.shape[1] else np.zeros((wave.shape[0],))   # [channels]
    if wave.shape[0] > 1 and peaks[0] < 1e-4 and peaks[1:].max() > 1e-3:
        loud = [names[i] if i < len(names) else str(i) for i in np.flatnonzero(peaks > 1e-3)]
        log.warning("%s: audio channel 0 (%s) is silent while channel(s) %s carry sound; "
                    "data.audio_channel=first decodes silence: set data.audio_channel=dialogue "
                    "(centre channel) or mean", path, names[0] if names else "0", ", ".join(loud))
    return wave[0]


def _kept_samples(decoded: int, stated_seconds: float, rate: int, frame_size: int) -> int:
    """How many decoded samples are the track: the stated duration's when the decode overshoots it by
    at most two codec frames (AAC / Opus / MP3 pad their last frame), else all of them: a larger
    overshoot means the duration is FFmpeg's estimate from the bitrate (a raw .aac, an .mp3 without
    a Xing header states a fraction of a long track), which the release's sf.read never cuts."""
    stated = int(round(stated_seconds * rate)) if stated_seconds > 0 else decoded
    padding = 2 * max(int(frame_size or 0), 1152)
    return stated if 0 <= decoded - stated <= padding else decoded


def _decode_audio(path: str, container, sample_rate: int, channel: str) -> np.ndarray:
    stream = container.streams.audio[0]
    chunks, rate, names = [], 0, []
    try:
        resampler = av.AudioResampler(format="fltp")        # keeps the track's layout and rate
        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray())              # [channels, samples]
                rate, names = out.sample_rate, [c.name for c in out.layout.channels]
        for out in resampler.resample(None):
            chunks.append(out.to_ndarray())
        if not chunks:
            return np.zeros((0,), np.float32)
        wave = np.concatenate(chunks, axis=1)                 # [channels, samples]
    except _DECODE_ERRORS as err:
        raise MediaError(path, "corrupt", f"audio decode failed: {err}") from err
    mono = _to_mono(path, wave, names, channel)
    mono = mono[: _kept_samples(mono.shape[0], _stream_seconds(stream, container), rate,
                                stream.codec_context.frame_size)]
    if rate != sample_rate:
        mono = soxr.resample(mono.astype(np.float32), rate, sample_rate, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)


def load_audio(path: str, sample_rate: int = 16000, channel: str = "first") -> np.ndarray:
    """Any audio (or video) file's first audio track -> float32 mono at `sample_rate`."""
    with _open(path) as container:
        if not container.streams.audio:
            raise MediaError(path, "no_audio", "file has no audio track")
        return _decode_audio(path, container, sample_rate, channel)


_UNUSED_TRACK_NOTED = False


def _note_unused_track(video: str) -> None:
    """Once per process: under data.video_audio=record a video record without "audio" is visual-only
    even when its file has sound (right for the release's video-only records, a silent loss for
    records that expect the file's track)."""
    global _UNUSED_TRACK_NOTED
    if not _UNUSED_TRACK_NOTED:
        _UNUSED_TRACK_NOTED = True
        print(f"data: NOTE {video} has an audio track that is not used: under data.video_audio=record "
              "(the release's rule, configs/7b*.py) a video record without an \"audio\" field is "
              "visual-only; name its audio in the record, or set --config.data.video_audio=track to "
              "take every video file's own track", file=sys.stderr)


def load_media(video: str | None = None, audio: str | None = None, *, fps: float = 1.0,
               max_frames: int = 110, sample_rate: int = 16000, min_audio_seconds: float = 1.0,
               missing_audio: str = "silence", channel: str = "first",
               frame_sampling: str = "grid", audio_cut: str = "none",
               image_size: int | None = None, video_audio: str = "track") -> Media:
    """Decode one record's media: a video (with its audio track) and/or a separate audio file.

    A video without an audio track: `missing_audio="silence"` gives silence of the video's
    length with `has_audio=False`; `"error"` raises MediaError("no_audio"). A separate audio
    file, when given, is used instead of the video's track; `audio` naming the video file itself
    is its own track. `video_audio="record"` (the release): a video without `audio` is
    visual-only (silence, `has_audio=False`), whatever its file holds. `frame_sampling` (target_times) and
    `audio_cut` (cut_audio) choose the release's forms. `image_size`: frames come resized to
    image_size x image_size (as siglip_resize would), decoded a chunk at a time.
    """
    if video is None and audio is None:
        raise ValueError("load_media needs a video or an audio path")
    if video_audio not in VIDEO_AUDIO:
        raise ValueError(f"data.video_audio must be one of {VIDEO_AUDIO}, got {video_audio!r}")
    own_track = audio == video or (audio is None and video_audio == "track")
    frames = np.zeros((0, 1, 1, 3), np.uint8)
    times = np.zeros((0,), np.float32)
    wave, has_audio, duration = None, False, 0.0
    if video is not None:
        with _open(video) as container:
            if not container.streams.video:
                raise MediaError(video, "no_video", "file has no video track")
            frames, times = _decode_frames(video, container, fps, max_frames, frame_sampling,
                                           image_size)
            stream = container.streams.video[0]   # the video's own duration, not the container's
            duration = _video_seconds(stream) or _stream_seconds(stream, container)
            if audio is None and not own_track and container.streams.audio:
                _note_unused_track(video)
        if own_track:
            with _open(video) as container:
                if container.streams.audio:
                    wave, has_audio = _decode_audio(video, container, sample_rate, channel), True
                elif missing_audio == "error":
                    raise MediaError(video, "no_audio", "video has no audio track")
                elif missing_audio != "silence":
                    raise ValueError(f"data.missing_audio must be 'silence' or 'error', "
                                     f"got {missing_audio!r}")
    if audio is not None and not own_track:
        wave, has_audio = load_audio(audio, sample_rate, channel), True
        if wave.shape[0] == 0:
            raise MediaError(audio, "no_samples", "audio track decodes to zero samples")
    if wave is None:
        wave = np.zeros((int(round(duration * sample_rate)),), np.float32)
    wave = cut_audio(wave, duration, sample_rate, audio_cut, max_frames / fps if fps > 0 else 0.0)
    seconds = wave.shape[0] / sample_rate
    minimum = int(np.ceil(min_audio_seconds * sample_rate))
    if wave.shape[0] < minimum:
        wave = np.pad(wave, (0, minimum - wave.shape[0]))
    return Media(frames=frames, frame_times=times, audio=wave, audio_seconds=float(seconds),
                 has_video=video is not None, has_audio=has_audio, video_seconds=float(duration))
