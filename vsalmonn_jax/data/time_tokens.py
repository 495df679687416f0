"""Per-frame time tokens: after frame i's visual tokens, the tokens of str(round(T / F * i, 1)),
i = 1..F. `data.time_tokens`: "official" gives them to video without audio only (the release's
--add_time_token, set by every release script); "all" to every video, audio-visual included (not
in the release, whose audio-visual sequences carry no time anchor; the demo uses it).

T = the video's duration, F = the sampled frames. Host side (Python's round and str, the
tokenizer); the model embeds the ids and zero-fills each frame's slots up to the longest string of
the example, as the release's pad_sequence does (models/connectors.py plan_time_tokens).
"""

from __future__ import annotations

import numpy as np

TIME_TOKEN_MODES = ("none", "official", "all")


def time_strings(video_seconds: float, num_frames: int) -> list[str]:
    """["1.0", "2.0", ...]: frame i's time text, the END of its share of the video (release form)."""
    per_frame = float(video_seconds) / num_frames
    return [str(round(per_frame * i, 1)) for i in range(1, num_frames + 1)]


def time_token_fields(tokenizer, video_seconds: float, num_frames: int) -> dict[str, np.ndarray]:
    """{"time_ids": int32 [F, K], "time_mask": bool [F, K]}: frame i's time tokens, left-aligned,
    K = the longest; padding slots are False in the mask (zero vectors in the model)."""
    if num_frames <= 0:
        raise ValueError("time tokens need at least one frame")
    if video_seconds <= 0:
        raise ValueError(f"time tokens need the video's duration, got {video_seconds} s")
    pieces = [list(tokenizer.encode(t, add_special_tokens=False))
              for t in time_strings(video_seconds, num_frames)]
    width = max(len(p) for p in pieces)
    ids = np.zeros((num_frames, width), np.int32)
    mask = np.zeros((num_frames, width), bool)
    for i, piece in enumerate(pieces):
        ids[i, :len(piece)], mask[i, :len(piece)] = piece, True
    return {"time_ids": ids, "time_mask": mask}


def stack_time_tokens(fields: list[dict | None], frames: int, width: int) -> dict[str, np.ndarray]:
    """Examples' `time_token_fields` (None: no time tokens) in one padded pair, time_ids int32 /
    time_mask bool [B, frames, width]; a string longer than `width` slots is an error."""
    ids = np.zeros((len(fields), frames, width), np.int32)
    mask = np.zeros((len(fields), frames, width), bool)
    for b, field in enumerate(fields):
        if field is None:
            continue
        n, k = field["time_ids"].shape
        if k > width:
            raise ValueError(f"row {b}: a time string is {k} tokens > {width} slots")
        ids[b, :n, :k], mask[b, :n, :k] = field["time_ids"], field["time_mask"]
    return {"time_ids": ids, "time_mask": mask}


def wants_time_tokens(mode: str, has_video: bool, has_audio: bool) -> bool:
    """`data.time_tokens` "official": video records without audio get time tokens; "all": every
    record with video."""
    if mode not in TIME_TOKEN_MODES:
        raise ValueError(f"data.time_tokens must be one of {TIME_TOKEN_MODES}, got {mode!r}")
    return has_video and (mode == "all" or (mode == "official" and not has_audio))
