"""The demo's encoder-output calibration (demo/calibrate.py): statistics over valid positions only,
standardised features, and why it exists: a constant-dominated feature hides the content."""

import numpy as np

from vsalmonn_jax.demo.calibrate import feature_stats, standardize, valid_masks


def _media(seed=0):
    rng = np.random.default_rng(seed)
    vision = (3.0 + 0.1 * rng.normal(size=(6, 4, 9, 8))).astype(np.float16)  # [N, F, P, H]
    audio = (-2.0 + 0.2 * rng.normal(size=(6, 1, 100, 5))).astype(np.float16)  # [N, 1, T, D]
    frame_mask = np.ones((6, 4), bool)
    frame_mask[:, 3] = False
    vision[:, 3] = 1e3                      # padding frames: must not enter the statistics
    seconds = np.array([1.0, 2.0, 0.5, 2.0, 1.5, 0.0], np.float32)
    for i, s in enumerate(seconds):
        audio[i, 0, int(s * 50):] = -1e3    # beyond the clip's audio: padding
    return {"vision": vision, "audio": audio, "frame_mask": frame_mask, "audio_seconds": seconds,
            "frame_times": np.zeros((6, 4), np.float32)}


def test_stats_use_valid_positions_only_and_standardize_them():
    media = _media()
    masks = valid_masks(media)
    assert masks["vision"].sum() == 6 * 3 and masks["audio"].sum() == int(50 * 7.0)
    stats = feature_stats(media)
    np.testing.assert_allclose(stats["vision"][0], 3.0, atol=0.02)
    np.testing.assert_allclose(stats["audio"][0], -2.0, atol=0.05)
    out = standardize(media, stats)
    for name in ("vision", "audio"):
        x = out[name][masks[name]].astype(np.float32).reshape(-1, media[name].shape[-1])
        np.testing.assert_allclose(x.mean(0), 0.0, atol=0.02)
        np.testing.assert_allclose(x.std(0), 1.0, atol=0.02)
        assert out[name].dtype == media[name].dtype
    assert out["frame_mask"] is media["frame_mask"]


def test_the_same_statistics_serve_every_split():
    stats = feature_stats(_media(0))
    other = standardize(_media(1), stats)            # a held-out split: train statistics, not its own
    expected = (_media(1)["vision"][:, :3].astype(np.float32) - stats["vision"][0]) / stats["vision"][1]
    np.testing.assert_allclose(other["vision"][:, :3].astype(np.float32), expected, atol=2e-2, rtol=2e-3)
