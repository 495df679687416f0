"""Feature parity: our SigLIP pixels and Whisper log-mel vs the transformers extractors (atol 1e-4)."""

import warnings

import numpy as np
import pytest
from PIL import Image

from vsalmonn_jax.data import features
from vsalmonn_jax.data.media import load_audio, load_media


@pytest.fixture(scope="module")
def siglip_hf():
    """The PIL-backend SigLIP processor (what the official release ran; the torchvision backend,
    when installed, resizes differently)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformers import SiglipImageProcessorPil

        return SiglipImageProcessorPil


def _hf_pixels(cls, frames, size):
    processor = cls(size={"height": size, "width": size})
    out = processor(list(frames), return_tensors="np")["pixel_values"]   # [N, 3, S, S]
    return out.transpose(0, 2, 3, 1)


@pytest.mark.parametrize("size", [384, 56])
def test_siglip_pixels_match_hf_on_decoded_video(media_dir, siglip_hf, size):
    frames = load_media(str(media_dir / "fps5_30s.mp4")).frames[:4]      # 32x32 -> upsample
    ours = features.siglip_pixels(frames, size)
    ref = _hf_pixels(siglip_hf, frames, size)
    assert ours.shape == (4, size, size, 3) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_siglip_pixels_match_hf_downsampling(media_dir, siglip_hf):
    frames = load_media(str(media_dir / "large.mp4")).frames               # 480x640 -> 384
    assert frames.shape[1:] == (480, 640, 3)
    np.testing.assert_allclose(features.siglip_pixels(frames, 384),
                               _hf_pixels(siglip_hf, frames, 384), atol=1e-4, rtol=0)


def test_frames_resized_while_decoding_equal_the_whole_set_resized(media_dir, monkeypatch):
    """load_media(image_size=S) (the featurizer's path) resizes a chunk of picked frames at a time:
    the same pixels as decoding every pick at full resolution, then resizing; at most one chunk of
    full-resolution frames is held (a 4K video's 110 picks were 2.7 GB)."""
    from vsalmonn_jax.data import media as media_lib

    path = str(media_dir / "fps5_30s.mp4")
    whole = load_media(path, max_frames=20).frames                    # 20 full-resolution picks
    chunks = []
    resize = media_lib.resize_bicubic_uint8
    monkeypatch.setattr(media_lib, "resize_bicubic_uint8",
                        lambda frames, h, w: chunks.append(len(frames)) or resize(frames, h, w))
    small = load_media(path, max_frames=20, image_size=56).frames
    assert small.shape == (20, 56, 56, 3) and chunks == [8, 8, 4]
    np.testing.assert_array_equal(small, features.siglip_resize(whole, 56))


@pytest.mark.parametrize("shape", [(37, 91, 56, 56), (10, 13, 56, 21), (300, 200, 384, 384),
                                   (1080, 1920, 384, 384), (384, 384, 384, 384)])
def test_resize_is_bit_equal_to_pillow_bicubic(shape):
    h, w, oh, ow = shape
    img = np.random.default_rng(h * w).integers(0, 256, (2, h, w, 3), dtype=np.uint8)
    ours = features.resize_bicubic_uint8(img, oh, ow)
    ref = np.stack([np.asarray(Image.fromarray(i).resize((ow, oh), Image.BICUBIC)) for i in img])
    np.testing.assert_array_equal(ours, ref)


def test_siglip_pixels_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8 frames"):
        features.siglip_pixels(np.zeros((2, 8, 8, 3), np.float32))


@pytest.fixture(scope="module")
def whisper_hf():
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor


def _hf_mel(cls, audio, bins):
    extractor = cls(feature_size=bins)
    return extractor(audio, sampling_rate=16000, return_tensors="np")["input_features"][0]


@pytest.mark.parametrize("bins", [128, 16])
def test_log_mel_matches_hf_on_48k_stereo_track(media_dir, whisper_hf, bins):
    audio = load_media(str(media_dir / "fps5_30s.mp4")).audio               # 48 kHz stereo -> 16k
    assert audio.shape == (30 * 16000,)
    ours = features.log_mel(audio, bins)
    assert ours.shape == (bins, 3000) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, _hf_mel(whisper_hf, audio, bins), atol=1e-4, rtol=0)


def test_log_mel_matches_hf_on_clip_shorter_than_one_second(media_dir, whisper_hf):
    media = load_media(str(media_dir / "short.mp4"))
    assert 0.5 < media.audio_seconds < 1.0
    assert media.audio.shape == (16000,)                                   # padded to 1 s
    np.testing.assert_allclose(features.log_mel(media.audio, 128),
                               _hf_mel(whisper_hf, media.audio, 128), atol=1e-4, rtol=0)
    raw = load_audio(str(media_dir / "short.mp4"))                         # unpadded < 1 s
    np.testing.assert_allclose(features.log_mel(raw, 128), _hf_mel(whisper_hf, raw, 128),
                               atol=1e-4, rtol=0)


def test_log_mel_chunks_are_30s_each(whisper_hf):
    audio = (np.random.default_rng(0).standard_normal(65 * 16000) * 0.1).astype(np.float32)
    chunks = features.log_mel_chunks(audio, 16)
    assert chunks.shape == (3, 16, 3000)
    for i in range(3):
        piece = audio[i * 480000:(i + 1) * 480000]
        np.testing.assert_allclose(chunks[i], _hf_mel(whisper_hf, piece, 16), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="at most 480000 samples"):
        features.log_mel(audio, 16)


def test_mel_filters_match_hf():
    from transformers.audio_utils import mel_filter_bank

    ref = mel_filter_bank(num_frequency_bins=201, num_mel_filters=128, min_frequency=0.0,
                          max_frequency=8000.0, sampling_rate=16000, norm="slaney",
                          mel_scale="slaney")
    np.testing.assert_allclose(features.mel_filters(128), ref, atol=1e-9, rtol=1e-7)
