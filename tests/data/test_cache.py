"""The decoded-media cache key: file contents, feature settings and the decoder's version."""


def test_a_decoder_change_does_not_reuse_old_entries(tmp_path, monkeypatch):
    """Decoding changed what unchanged settings give (the release's frame steps, audio-only cuts):
    an existing cache returned the old frames / audio; the key holds DECODE_VERSION."""
    from vsalmonn_jax.data import cache

    clip = tmp_path / "a.mp4"
    clip.write_bytes(b"not really a video")
    settings = {"fps": 1.0, "max_frames": 110}
    key = cache.media_key({"video": str(clip), "audio": None}, settings)
    assert key == cache.media_key({"video": str(clip), "audio": None}, dict(settings))
    monkeypatch.setattr(cache, "DECODE_VERSION", cache.DECODE_VERSION + 1)
    assert cache.media_key({"video": str(clip), "audio": None}, settings) != key
