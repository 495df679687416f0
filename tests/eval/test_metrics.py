"""Caption metrics: repeat collapse boundaries, seq-rep, duplicate sentences, micro vs macro."""

import pytest

from vsalmonn_jax.eval.metrics import (
    VideoScore,
    aggregate,
    collapse_repeats,
    duplicate_sentences,
    repetition_stats,
    seq_rep,
)
from vsalmonn_jax.eval.text import numbers, split_sentences, split_units

UNIT_49 = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLM"  # no internal repeats
UNIT_50 = UNIT_49 + "N"
UNIT_99 = UNIT_50 + "OPQRSTUVWXYZ!@#$%^&*()_+=-[]{};:<>?/|~`" + "\u00e9\u00e8\u00ea\u00eb\u00ee\u00ef\u00f4\u00f6\u00fb\u00fc"


def test_collapse_short_units_need_five_copies():
    assert collapse_repeats("ab" * 4) == "ab" * 4
    assert collapse_repeats("ab" * 5) == "ab"
    assert collapse_repeats("x" + "ab" * 9 + "y") == "xaby"
    assert len(UNIT_49) == 49
    assert collapse_repeats(UNIT_49 * 4) == UNIT_49 * 4
    assert collapse_repeats(UNIT_49 * 5) == UNIT_49


def test_collapse_long_units_need_four_copies():
    assert len(UNIT_50) == 50 and len(UNIT_99) == 99
    assert collapse_repeats(UNIT_50 * 3) == UNIT_50 * 3
    assert collapse_repeats(UNIT_50 * 4) == UNIT_50
    assert collapse_repeats(UNIT_99 * 4) == UNIT_99
    unit_100 = UNIT_99 + "Z"  # beyond the rule: 100-char repeats stay
    assert collapse_repeats(unit_100 * 4) == unit_100 * 4


def test_collapse_sentence_repeats_across_spaces():
    head = "A red circle appears. "
    loop = "The dog barks."
    assert collapse_repeats(head + " ".join([loop] * 5)) == head + loop
    assert collapse_repeats(head + " ".join([loop] * 4)) == head + " ".join([loop] * 4)
    # eight copies of a 31-char sentence: the unit is the sentence, not two sentences (63 chars)
    sentence = "At 1 s, the red circle appears."
    assert collapse_repeats(" ".join([sentence] * 8)) == sentence


def test_seq_rep_and_duplicates():
    assert seq_rep("a b c d a b c d") == pytest.approx(1 - 4 / 5)
    assert seq_rep("one two three") == 0.0
    assert seq_rep("A dog barks. A dog barks. A dog barks.", n=4) == pytest.approx(1 - 3 / 6)
    assert duplicate_sentences("A dog barks. A cat sits. a dog barks! A dog barks.") == (2, 4)
    stats = repetition_stats(["A dog barks. A dog barks.", "One two three four."], [True, False])
    assert stats["duplicate_sentence_rate"] == pytest.approx(1 / 3)
    assert stats["no_end_token_rate"] == 0.5
    # "a dog barks a dog barks": 4-grams (adba, dbad, badb) are unique -> 0; second has one -> 0
    assert stats["seq_rep_4"] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="2 captions but 1 stopped"):
        repetition_stats(["a", "b"], [True])


def test_micro_and_macro_differ_by_hand():
    scores = [
        VideoScore(id="long", num_events=10, missed=1, incorrect=0, hallucinated=1),
        VideoScore(id="short", num_events=2, missed=2, incorrect=0, hallucinated=0),
        VideoScore(id="broken", num_events=5, failed=True, error="judge failed"),
    ]
    result = aggregate(scores)
    assert result["events"] == 12 and result["scored"] == 2
    assert result["failed_ids"] == ["broken"] and result["failed_errors"] == {"broken": "judge failed"}
    micro, macro = result["micro"], result["macro"]
    assert micro["miss"] == pytest.approx(3 / 12)
    assert macro["miss"] == pytest.approx((1 / 10 + 2 / 2) / 2)          # 0.55 vs 0.25
    assert micro["hallucination"] == pytest.approx(1 / 12)
    assert macro["hallucination"] == pytest.approx((1 / 10 + 0) / 2)
    assert micro["total"] == pytest.approx(4 / 12)
    assert macro["total"] == pytest.approx((2 / 10 + 2 / 2) / 2)
    assert micro["incorrect_plus_hallucination"] == pytest.approx(1 / 12)
    assert result["partial_ids"] == []
    partial = VideoScore(id="p", num_events=1, details={"passes": 7, "passes_ok": 5})
    assert aggregate([partial])["partial_ids"] == ["p"]


def test_aggregate_edge_cases():
    empty = aggregate([])
    assert empty["micro"] is None and empty["macro"] is None and empty["videos"] == 0
    only_failed = aggregate([VideoScore(id="x", num_events=3, failed=True)])
    assert only_failed["micro"] is None and only_failed["failed"] == 1
    no_events = aggregate([VideoScore(id="n", num_events=0, hallucinated=2),
                           VideoScore(id="m", num_events=4, missed=1)])
    assert no_events["videos_without_events"] == 1
    assert no_events["micro"]["hallucination"] == pytest.approx(2 / 4)
    assert no_events["macro"]["hallucination"] == 0.0
    roundtrip = VideoScore.from_dict(VideoScore(id="r", num_events=2, missed=1).to_dict())
    assert roundtrip.rate("missed") == 0.5 and roundtrip.total == 1


def test_text_splitting():
    text = "Mr. Smith walks in at 2.5 s. He sits down; the dog barks, and then a bell rings!\nEnd"
    assert split_sentences(text) == ["Mr. Smith walks in at 2.5 s.",
                                     "He sits down; the dog barks, and then a bell rings!", "End"]
    assert split_units(text) == ["Mr. Smith walks in at 2.5 s.", "He sits down",
                                 "the dog barks", "a bell rings!", "End"]
    assert split_units("At 3 s, the red circle moves left.") == ["At 3 s, the red circle moves left."]
    assert numbers("At 12 s and 2.5 s") == {12.0, 2.5}
    assert split_sentences('She says "hello." He waves (slowly.) Done') == [
        'She says "hello."', "He waves (slowly.)", "Done"]
