"""Per-frame time tokens (data.time_tokens=official): the release's strings, a video-only record
gets them through the Featurizer and collate, a record with audio does not (it does under "all")."""

import numpy as np
import pytest

from vsalmonn_jax.config import load_config
from vsalmonn_jax.data.collate import collate
from vsalmonn_jax.data.encode import write_video
from vsalmonn_jax.data.example import Featurizer
from vsalmonn_jax.data.time_tokens import stack_time_tokens, time_strings


def test_time_strings_are_the_release_form():
    """str(round(T / F * i, 1)) for i = 1..F: the end of each frame's share of the video."""
    assert time_strings(30.0, 30)[:3] == ["1.0", "2.0", "3.0"] and time_strings(30.0, 30)[-1] == "30.0"
    assert time_strings(10.0, 3) == ["3.3", "6.7", "10.0"]
    assert time_strings(200.0, 110)[:2] == [str(round(200 / 110, 1)), str(round(400 / 110, 1))]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("time_tokens")
    frames = np.random.default_rng(0).integers(0, 255, (3, 16, 16, 3), dtype=np.uint8)
    write_video(root / "silent.mp4", frames, fps=1)
    t = np.arange(3 * 16000) / 16000
    write_video(root / "sound.mp4", frames, fps=1,
                audio=(0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), sample_rate=16000)
    return root


def test_video_without_audio_gets_time_tokens_and_with_audio_none(clips, synth_dir):
    config = load_config("tiny", [f"data.tokenizer={synth_dir / 'tokenizer'}",
                                  "data.time_tokens=official"])
    featurizer = Featurizer.from_config(config)
    tok = featurizer.tokenizer
    silent = featurizer({"kind": "caption", "video": str(clips / "silent.mp4"), "index": 0})
    sound = featurizer({"kind": "caption", "video": str(clips / "sound.mp4"), "index": 1})
    assert "failed" not in silent and "failed" not in sound
    assert not silent["has_audio"] and sound["has_audio"]
    texts = [tok.decode(ids[mask]) for ids, mask in zip(silent["time_ids"], silent["time_mask"],
                                                       strict=True)]
    assert texts == ["1.0", "2.0", "3.0"]
    assert "time_ids" not in sound
    batch = collate([silent, sound], pad_id=0, image_size=56, num_mel_bins=16)
    assert batch["time_ids"].shape == (2, 4, 4) and batch["time_mask"].shape == (2, 4, 4)
    width = silent["time_ids"].shape[1]
    np.testing.assert_array_equal(batch["time_ids"][0, :3, :width], silent["time_ids"])
    np.testing.assert_array_equal(batch["time_mask"][0, :3, :width], silent["time_mask"])
    assert batch["time_mask"].sum() == silent["time_mask"].sum()       # nothing for the AV row
    clean = Featurizer.from_config(load_config("tiny", [f"data.tokenizer={synth_dir / 'tokenizer'}"]))
    assert "time_ids" not in clean({"kind": "caption", "video": str(clips / "silent.mp4"), "index": 0})
    with pytest.raises(ValueError, match="time_tokens must be one of"):
        Featurizer.from_config(load_config("tiny", ["data.time_tokens=yes"]))


def test_all_gives_audio_visual_video_time_tokens_too(clips, synth_dir):
    """data.time_tokens=all (not in the release): a video with audio gets the same time tokens a
    silent one gets under "official"; a record without video gets none."""
    featurizer = Featurizer.from_config(load_config("tiny", [
        f"data.tokenizer={synth_dir / 'tokenizer'}", "data.time_tokens=all"]))
    tok = featurizer.tokenizer
    sound = featurizer({"kind": "caption", "video": str(clips / "sound.mp4"), "index": 1})
    assert "failed" not in sound and sound["has_audio"]
    texts = [tok.decode(ids[mask]) for ids, mask in zip(sound["time_ids"], sound["time_mask"],
                                                       strict=True)]
    assert texts == ["1.0", "2.0", "3.0"]
    audio_only = featurizer({"kind": "caption", "audio": str(clips / "sound.mp4"), "index": 2})
    assert "failed" not in audio_only and "time_ids" not in audio_only


def test_stack_time_tokens_pads_rows_and_refuses_a_string_wider_than_the_slots():
    """One helper stacks per-example fields for collate (power-of-two width) and the demo (fixed
    slots): each row left-aligned in its frames, a missing row all padding, too wide an error."""
    a = {"time_ids": np.array([[5, 6], [7, 0]], np.int32), "time_mask": np.array([[1, 1], [1, 0]], bool)}
    b = {"time_ids": np.array([[9]], np.int32), "time_mask": np.array([[1]], bool)}
    out = stack_time_tokens([a, None, b], frames=3, width=4)
    assert out["time_ids"].shape == out["time_mask"].shape == (3, 3, 4)
    np.testing.assert_array_equal(out["time_ids"][0], [[5, 6, 0, 0], [7, 0, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(out["time_mask"][0].sum(1), [2, 1, 0])
    assert not out["time_mask"][1].any() and out["time_ids"][2, 0, 0] == 9 and out["time_mask"].sum() == 4
    with pytest.raises(ValueError, match="row 0: a time string is 2 tokens > 1 slots"):
        stack_time_tokens([a], frames=2, width=1)


def test_max_length_counts_the_media_positions(clips, synth_dir):
    """data.max_length counted text tokens only: a conversation that fits as text but not with its
    ~frames x tokens-per-frame media trained past max_length (the release cuts the embedded
    sequence at its model_max_length)."""
    from vsalmonn_jax.data.example import media_positions

    record = {"kind": "sft", "video": str(clips / "sound.mp4"), "index": 0,
              "conversations": [{"role": "user", "content": "<media>\nDescribe."},
                                {"role": "assistant", "content": "At 1 s, the red circle appears. " * 6}]}
    base = [f"data.tokenizer={synth_dir / 'tokenizer'}"]
    roomy = Featurizer.from_config(load_config("tiny", base))
    example = roomy(dict(record))
    media = media_positions(example, roomy.av_config)
    text = len(example["input_ids"])
    assert media > 0 and "failed" not in example
    tight = [*base, f"data.max_length={text + media - 5}"]   # text fits, text + media does not
    refused = Featurizer.from_config(load_config("tiny", tight))(dict(record))
    assert refused["failed"] == "text" and "with its media" in refused["detail"]
    assert f"(+{media} reserved)" in refused["detail"]
    cut = Featurizer.from_config(load_config("tiny", [*tight, "data.truncation=truncate_response"]))(
        dict(record))
    assert "failed" not in cut and len(cut["input_ids"]) + media == text + media - 5
    np.testing.assert_array_equal(cut["input_ids"], example["input_ids"][:len(cut["input_ids"])])
    fits = Featurizer.from_config(load_config("tiny", [*base, f"data.max_length={text + media}"]))
    np.testing.assert_array_equal(fits(dict(record))["input_ids"], example["input_ids"])
