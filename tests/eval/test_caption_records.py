"""Captions from outside (the official release's inference output, decoded keeping special tokens):
a missing `stopped` comes from the end token, and special-token strings are never judged."""

import json

import pytest

from vsalmonn_jax.eval.exact import ExactJudge
from vsalmonn_jax.eval.records import RecordError, load_captions, strip_special_tokens
from vsalmonn_jax.eval.run import evaluate, judged_text


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("text, expected", [
    ("A dog barks.<|im_end|>", ("A dog barks.", True)),
    ("A dog barks. <|im_end|><|endoftext|><|endoftext|>", ("A dog barks.", True)),
    ("<|im_start|>A dog barks.<|endoftext|>", ("A dog barks.", True)),
    ("A dog barks.<|im_end|>\n<|im_start|>user\nmore", ("A dog barks.", True)),
    ("A dog <|vision_start|>barks. A dog barks.", ("A dog barks. A dog barks.", False)),
    (" A dog barks. ", (" A dog barks. ", False)),       # no special token: unchanged
])
def test_strip_special_tokens(text, expected):
    assert strip_special_tokens(text) == expected


def test_release_output_without_stopped_field(tmp_path):
    """The release's finished captions end in a literal <|im_end|>; one that hit the length limit
    has none. All used to load as stopped=True with the token text in the caption."""
    loop = "A dog barks. " * 6
    path = _write(tmp_path / "release.jsonl", [
        {"id": "a", "caption": "A man opens a door. A dog barks.<|im_end|>"},
        {"id": "b", "caption": loop.strip()},
        {"id": "c", "caption": "Rain falls.<|endoftext|>"},
        {"id": "d", "caption": "A bell rings.", "stopped": True},     # an explicit field wins
    ])
    records = {r.id: r for r in load_captions(path)}
    assert {k: r.stopped for k, r in records.items()} == {"a": True, "b": False, "c": True, "d": True}
    assert records["a"].caption == "A man opens a door. A dog barks."
    assert records["c"].caption == "Rain falls."
    assert "<|" not in "".join(judged_text(r) for r in records.values())
    assert judged_text(records["b"]) == "A dog barks."            # the runaway one is collapsed


def test_plain_captions_without_stopped_field_default_to_stopped(tmp_path):
    path = _write(tmp_path / "plain.jsonl", [{"id": "a", "caption": "A dog barks. A dog barks."},
                                             {"id": "b", "caption": "A bell rings.", "stopped": False}])
    assert [(r.caption, r.stopped) for r in load_captions(path)] == [
        ("A dog barks. A dog barks.", True), ("A bell rings.", False)]
    with pytest.raises(RecordError, match="'stopped' must be a boolean"):
        load_captions(_write(tmp_path / "bad.jsonl", [{"id": "a", "caption": "x", "stopped": None}]))


def test_the_token_text_is_not_judged(tmp_path):
    from vsalmonn_jax.data import synthetic_scene

    scene = synthetic_scene.make_scene(3, 11)
    caption = synthetic_scene.reference_caption(scene)
    path = _write(tmp_path / "release.jsonl", [{"id": "v", "caption": caption + "<|im_end|>"}])
    result = evaluate(load_captions(path), {"v": scene.events}, ExactJudge())
    score = result["groups"][0]["scores"][0]
    assert (score.missed, score.incorrect, score.hallucinated) == (0, 0, 0)
    assert result["groups"][0]["repetition"]["no_end_token_rate"] == 0.0
