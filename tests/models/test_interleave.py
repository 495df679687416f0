"""Audio-visual interleaving: exact lengths and order for 1, 7 and 110 frames with 0.4 s, 29.9 s,
30 s and 61 s of audio, in the clean timestamp mode and the official nearest-interpolation QUIRK
(checked against a line-by-line torch re-run of the official code), plus audio-only / video-only.

Formulas (V = 182 visual tokens per frame, 2 audio tokens per second, 60 per 30-s chunk):
  timestamp: length = n_frames * V + ceil(2 * seconds); frame i gets the audio tokens starting in
             [t_i, t_{i+1}) (the last frame keeps the rest).
  official:  n_all = 60 * ceil(seconds / 30) (padding included), front = min(round(50 * T), n_all),
             front nearest-interpolated to the next multiple of n_frames, k = that / n_frames per
             frame, then the (n_all - front) back tokens: length = n * V + ceil_mult(front) + back.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from vsalmonn_jax.models.connectors import (
    audio_token_count,
    gather_media,
    plan_official,
    plan_timestamp,
)

V, RATE, PER_CHUNK = 182, 2.0, 60

# one compiled program per case instead of many eagerly dispatched ops
plan_timestamp = jax.jit(plan_timestamp, static_argnums=(0, 1, 2, 6))
plan_official = jax.jit(plan_official, static_argnums=(0, 1, 2))
gather_media = jax.jit(gather_media)


def _tables(frames, chunks):
    """visual token (i, p) has value 1000 * (i + 1) + p; audio token j has value -(j + 1)."""
    visual = (1000 * (np.arange(frames)[:, None] + 1) + np.arange(V)[None]).astype(np.float32)
    audio = -(np.arange(chunks * PER_CHUNK) + 1).astype(np.float32)
    return visual[..., None], audio[:, None]


def _timestamp_reference(n_frames, n_audio):
    out = []
    times = np.arange(n_frames, dtype=np.float32)
    for i in range(n_frames):
        out += [1000 * (i + 1) + p for p in range(V)]
        start = times[i] if i > 0 else -np.inf
        end = times[i + 1] if i + 1 < n_frames else np.inf
        out += [-(j + 1) for j in range(n_audio) if start <= j / RATE < end]
    if n_frames == 0:
        out = [-(j + 1) for j in range(n_audio)]
    return out


def _official_reference(n_frames, chunks, seconds):
    """The official prepare_inputs_labels_for_multimodal AV branch, re-run with torch."""
    speech = -(torch.arange(chunks * PER_CHUNK, dtype=torch.float32) + 1)[:, None]
    if n_frames == 0:
        return speech[:, 0].tolist()
    image = (1000 * (torch.arange(n_frames)[:, None] + 1) + torch.arange(V)[None]).float()[..., None]
    front_num = round(seconds * 50)
    front, back = speech[:front_num, :], speech[front_num:, :]
    if (ip_delta := front.size(0) % image.size(0)) != 0:
        after = front.size(0) + image.size(0) - ip_delta
        front = torch.nn.functional.interpolate(front.unsqueeze(0).transpose(1, 2), size=after,
                                                mode="nearest").transpose(1, 2).squeeze(0)
    front = front.view(image.size(0), -1, front.size(-1))
    av = torch.cat([image, front], dim=1).view(-1, 1)
    return torch.cat([av, back], dim=0)[:, 0].tolist()


CASES = [(f, s) for f in (1, 7, 110) for s in (0.4, 29.9, 30.0, 61.0)]


@pytest.mark.parametrize("frames,seconds", CASES)
def test_timestamp_interleave(frames, seconds):
    chunks = math.ceil(seconds / 30)
    visual, audio = _tables(frames, chunks)
    n_audio = audio_token_count(jnp.float32(seconds), RATE, chunks * PER_CHUNK)
    assert int(n_audio) == {0.4: 1, 29.9: 60, 30.0: 60, 61.0: 122}[seconds]
    index, length = plan_timestamp(frames, V, chunks * PER_CHUNK, jnp.int32(frames),
                                   jnp.arange(frames, dtype=jnp.float32), n_audio, RATE)
    media, mask = gather_media(jnp.asarray(visual), jnp.asarray(audio), index, length)
    assert int(length) == frames * V + int(n_audio) == int(mask.sum())
    got = np.asarray(media)[: int(length), 0].tolist()
    assert got == _timestamp_reference(frames, int(n_audio))
    assert np.all(np.asarray(media)[int(length):] == 0)


@pytest.mark.parametrize("frames,seconds", CASES)
def test_official_interleave_matches_official_code(frames, seconds):
    chunks = math.ceil(seconds / 30)
    visual, audio = _tables(frames, chunks)
    index, length = plan_official(frames, V, chunks * PER_CHUNK, jnp.int32(frames),
                                  jnp.int32(chunks * PER_CHUNK), jnp.float32(seconds))
    media, mask = gather_media(jnp.asarray(visual), jnp.asarray(audio), index, length)
    expected = _official_reference(frames, chunks, seconds)
    assert int(length) == len(expected) == int(mask.sum())
    assert np.asarray(media)[: int(length), 0].tolist() == expected


def test_official_lengths_by_formula():
    expect = {(1, 0.4): 182 + 20 + 40, (7, 29.9): 7 * 182 + 63, (110, 30.0): 110 * 182 + 110,
              (7, 61.0): 7 * 182 + 182, (110, 61.0): 110 * 182 + 220}
    for (frames, seconds), n in expect.items():
        chunks = math.ceil(seconds / 30)
        _, length = plan_official(frames, V, chunks * PER_CHUNK, jnp.int32(frames),
                                  jnp.int32(chunks * PER_CHUNK), jnp.float32(seconds))
        assert int(length) == n, (frames, seconds)


@pytest.mark.parametrize("plan", ["timestamp", "official"])
def test_audio_only_and_video_only(plan):
    frames, chunks = 7, 3
    visual, audio = _tables(frames, chunks)
    for n_frames, n_audio in ((0, 122), (5, 0)):
        if plan == "timestamp":
            index, length = plan_timestamp(frames, V, chunks * PER_CHUNK, jnp.int32(n_frames),
                                           jnp.arange(frames, dtype=jnp.float32), jnp.int32(n_audio), RATE)
        else:
            index, length = plan_official(frames, V, chunks * PER_CHUNK, jnp.int32(n_frames),
                                          jnp.int32(n_audio), jnp.float32(61.0 if n_audio else 0))
        media, _ = gather_media(jnp.asarray(visual), jnp.asarray(audio), index, length)
        got = np.asarray(media)[: int(length), 0]
        if n_frames == 0:
            assert got.tolist() == [-(j + 1) for j in range(n_audio)]
        else:
            assert got.tolist() == visual[:n_frames, :, 0].reshape(-1).tolist()


def test_timestamp_follows_frame_times_and_vmaps():
    """Frames at 0, 2.5, 5 s (resampled video): frame 0 takes tokens in [0, 2.5), frame 1 [2.5, 5)."""
    visual, audio = _tables(3, 1)
    plan = jax.vmap(lambda t, n: plan_timestamp(3, V, PER_CHUNK, jnp.int32(3), t, n, RATE))
    index, length = plan(jnp.array([[0.0, 2.5, 5.0]] * 2), jnp.array([14, 4], jnp.int32))
    media, _ = jax.vmap(gather_media, in_axes=(None, None, 0, 0))(
        jnp.asarray(visual), jnp.asarray(audio), index, length)
    got = np.asarray(media)[0, : int(length[0]), 0]
    audio_runs = [got[(i + 1) * V + sum(c for c in (5, 5)[:i]):][:n].tolist()
                  for i, n in enumerate((5, 5, 4))]
    assert audio_runs == [[-1, -2, -3, -4, -5], [-6, -7, -8, -9, -10], [-11, -12, -13, -14]]
    assert int(length[1]) == 3 * V + 4
