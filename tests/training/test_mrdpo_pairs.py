"""mrDPO pair building: the ranking rules (total, miss-weighted), ties, best-vs-worst of k, all pairs,
GT / CE-only records, collapsed unterminated samples, with the exact judge on grammar captions."""

import pytest

from vsalmonn_jax.data.event_grammar import render_caption
from vsalmonn_jax.eval import get_judge
from vsalmonn_jax.eval.metrics import VideoScore
from vsalmonn_jax.training.pairs import (
    PairRule,
    Sample,
    build_pairs,
    judged_text,
    pair_stats,
    score_samples,
)

EVENTS = [
    {"time": 0, "modality": "visual", "subject": "the red circle", "action": "appears"},
    {"time": 1, "modality": "audio", "subject": "a high beep", "action": "sounds"},
    {"time": 2, "modality": "visual", "subject": "the red circle", "action": "moves left"},
]
ITEM = {"id": "clip0", "video": "media/train/train_000000.mp4", "prompt": "Describe it.",
        "events": EVENTS, "caption": render_caption(EVENTS)}


def _score(m=0, i=0, h=0, n=3):
    return VideoScore(num_events=n, missed=m, incorrect=i, hallucinated=h)


def _pairs(scores, rule=None, **kw):
    rule = rule or PairRule()
    samples = [[Sample(f"caption {j}.") for j in range(len(scores))]]
    return build_pairs([ITEM], samples, [scores], rule, default_prompt="default", **kw)


def test_exact_judge_ranks_grammar_captions_and_builds_a_full_record():
    complete = render_caption(EVENTS)
    lossy = render_caption(EVENTS[:1] + [dict(EVENTS[2], subject="the blue circle")]) + \
        " At 3 s, a low beep sounds."
    samples = [[Sample(lossy), Sample(complete)]]
    scores = score_samples(get_judge("exact"), [ITEM], samples)
    assert [(s.missed, s.incorrect, s.hallucinated) for s in scores[0]] == [(1, 1, 1), (0, 0, 0)]
    (record,) = build_pairs([ITEM], samples, scores, PairRule(), default_prompt="default")
    assert record["chosen"] == complete and record["rejected"] == lossy
    assert record["gt"] == ITEM["caption"] and record["prompt"] == "Describe it."
    assert record["video"] == ITEM["video"] and record["video_id"] == "clip0"
    assert (record["chosen_error"], record["rejected_error"]) == (0.0, 3.0)
    stats = pair_stats([ITEM], samples, scores, [record])
    assert stats["pairs"] == 1 and stats["samples"] == 2
    assert stats["sample_total"] == pytest.approx(3 / 6)
    assert stats["mean_error_margin"] == 3.0


def test_ties_are_dropped_by_default_and_broken_on_request():
    tied = [_score(m=1, h=1), _score(m=2)]
    assert _pairs(tied) == []
    (record,) = _pairs(tied, PairRule(drop_ties=False))   # fewer hallucinations wins the tie
    assert record["id"] == "clip0:1>0"
    assert _pairs([_score(m=1), _score(m=1)], PairRule(drop_ties=False)) == []


def test_miss_weighted_rule_prefers_complete_captions():
    terse, wordy = _score(m=2), _score(h=3)   # total 2 vs 3; miss-weighted 4 vs 3
    assert _pairs([terse, wordy])[0]["id"] == "clip0:0>1"
    assert _pairs([terse, wordy], PairRule(rule="miss_weighted", miss_weight=2.0))[0]["id"] == \
        "clip0:1>0"


def test_dominance_rule_never_prefers_a_caption_that_misses_more():
    rule = PairRule(rule="dominance")
    terse, wordy = _score(m=2), _score(h=3)   # neither dominates: no pair (total would take terse)
    assert _pairs([terse, wordy], rule) == []
    # best-vs-worst under dominance: the accepted pair with the largest margin, not argmin/argmax
    scores = [_score(m=1), _score(h=4), _score(m=1, h=2), _score(m=2, h=2)]
    (record,) = _pairs(scores, rule)
    assert record["id"] == "clip0:0>3"            # 0 dominates 2 (margin 2) and 3 (margin 3)
    assert sorted(r["id"] for r in _pairs(scores, PairRule(rule="dominance", mode="all"))) == \
        ["clip0:0>2", "clip0:0>3", "clip0:2>3"]
    assert _pairs([_score(m=1), _score(m=1, i=1)], PairRule(rule="dominance", min_margin=1.0)) == []


def test_best_worst_of_k_and_all_pairs():
    scores = [_score(m=2), _score(), _score(h=3), _score(m=2)]
    (best_worst,) = _pairs(scores)
    assert best_worst["id"] == "clip0:1>2"
    everything = _pairs(scores, PairRule(mode="all"))
    assert sorted(r["id"] for r in everything) == ["clip0:0>2", "clip0:1>0", "clip0:1>2",
                                                  "clip0:1>3", "clip0:3>2"]
    assert all(r["chosen_error"] < r["rejected_error"] for r in everything)
    assert _pairs(scores, PairRule(min_margin=3.0)) == []   # 0 vs 3 is not > 3


def test_failed_scores_never_pair_and_ce_only_records():
    failed = VideoScore(num_events=3, failed=True, error="judge down")
    assert _pairs([_score(), failed]) == []
    (record,) = _pairs([_score(), failed], ce_only_records=True)
    assert record == {"video": ITEM["video"], "prompt": "Describe it.", "id": "clip0:gt",
                      "video_id": "clip0", "gt": ITEM["caption"]}
    (no_gt,) = _pairs([_score(), _score(h=1)], gt=False)
    assert "gt" not in no_gt


def test_unterminated_samples_are_judged_and_trained_collapsed():
    looping = Sample("At 0 s, the red circle appears. " * 8, stopped=False)
    assert judged_text(looping).count("appears") == 1
    assert judged_text(Sample("x x x x x x", stopped=True)) == "x x x x x x"
    scores = score_samples(get_judge("exact"), [ITEM], [[looping, Sample(ITEM["caption"])]])
    assert scores[0][0].hallucinated == 0 and scores[0][0].missed == 2


def test_an_unfinished_rejected_sample_as_sampled_trains_without_an_end_token(tmp_path):
    """mrdpo.unfinished=as_sampled: a rejected sample that looped to max_new_tokens is trained as the
    policy wrote it (full text, no <|im_end|>), not as its first cycle + an end token."""
    import numpy as np
    from mrdpo_helpers import tokenizer

    from vsalmonn_jax.data.example import text_fields
    from vsalmonn_jax.data.text import IM_END, token_id

    looping = Sample("At 0 s, the red circle appears. " * 8, stopped=False)
    rows = [[Sample(ITEM["caption"]), looping]]
    scores = [[_score(), _score(h=2)]]
    (collapsed,) = build_pairs([ITEM], rows, scores, PairRule(), default_prompt="d")
    (sampled,) = build_pairs([ITEM], rows, scores, PairRule(), default_prompt="d",
                             unfinished="as_sampled")
    assert collapsed["rejected"].count("appears") == 1 and "rejected_stopped" not in collapsed
    assert sampled["rejected"] == looping.text and sampled["rejected_stopped"] is False
    assert sampled["chosen"] == collapsed["chosen"]
    with pytest.raises(ValueError, match="mrdpo.unfinished must be one of"):
        build_pairs([ITEM], rows, scores, PairRule(), default_prompt="d", unfinished="raw")
    tok = tokenizer(str(tmp_path / "tok"))
    end = token_id(tok, IM_END)
    fields = {name: text_fields(dict(record, kind="preference"), tok, placeholder="<media>",
                                has_media=False, max_length=None, truncation="error",
                                default_prompt="d")
              for name, record in (("collapsed", collapsed), ("sampled", sampled))}
    for name, want_end in (("collapsed", True), ("sampled", False)):
        ids, mask = fields[name]["rejected_input_ids"], fields[name]["rejected_loss_mask"]
        assert (ids[-1] == end) == want_end and mask[-1]
        assert fields[name]["chosen_input_ids"][-1] == end       # the chosen side always ends
    assert np.count_nonzero(fields["sampled"]["rejected_loss_mask"]) > \
        np.count_nonzero(fields["collapsed"]["rejected_loss_mask"])


def test_bad_rule_and_missing_events_are_named():
    with pytest.raises(ValueError, match="pair_rule"):
        PairRule(rule="shortest")
    with pytest.raises(ValueError, match="pair_mode"):
        PairRule(mode="random")
    with pytest.raises(ValueError, match="'clip9'.*events"):
        score_samples(get_judge("exact"), [{"id": "clip9"}], [[Sample("a")]])


def test_free_text_events_are_paired_by_the_embedding_judge(tmp_path):
    """Free-text ground truth (the official test set's form): validated as caption records, judged by
    the packaged embedding judge, paired; the exact judge refuses it by file:line."""
    from vsalmonn_jax.data.records import from_rows
    from vsalmonn_jax.training.pairs import check_judgeable

    events = ["A man in a red shirt opens the front door.", "A dog barks twice.",
              "Heavy rain falls on the roof."]
    (item,) = from_rows([{"id": "v0", "video": "v0.mp4", "events": events,
                          "caption": " ".join(events)}], "caption", str(tmp_path), source="free.jsonl")
    samples = [[Sample("A chef slices onions in a bright kitchen."), Sample(" ".join(events[:2]))]]
    scores = score_samples(get_judge("embedding"), [item], samples)
    assert [(s.missed, s.hallucinated) for s in scores[0]] == [(3, 1), (1, 0)]
    (record,) = build_pairs([item], samples, scores, PairRule(), default_prompt="Describe.")
    assert record["chosen"] == samples[0][1].text and record["rejected"] == samples[0][0].text
    assert (record["chosen_error"], record["rejected_error"]) == (1.0, 4.0)
    check_judgeable([item], "embedding")
    with pytest.raises(ValueError, match=r"free.jsonl:1: events\[0\] is free text .* "
                       "set --config.mrdpo.judge=embedding or llm"):
        check_judgeable([item], "exact")


def _texts_pairs(texts, scores, rule):
    samples = [[Sample(t) for t in texts]]
    return build_pairs([ITEM], samples, [scores], rule, default_prompt="default")


def test_length_controlled_pairs_and_length_stats():
    """mrdpo.max_length_gap (not in the paper): the pair's captions differ by <= gap sentences."""
    from vsalmonn_jax.training.pairs import length_stats

    texts = ["A. B.", "A. B. C. D. E.", "A. B. C."]       # 2, 5 and 3 sentences
    scores = [_score(m=1), _score(m=1, h=3), _score(m=1, h=1)]
    (free,) = _texts_pairs(texts, scores, PairRule())
    assert free["id"] == "clip0:0>1"                      # best vs worst: 2 vs 5 sentences
    (close,) = _texts_pairs(texts, scores, PairRule(max_length_gap=1))
    assert close["id"] == "clip0:0>2"                     # the widest pair within 1 sentence
    assert _texts_pairs(texts, scores, PairRule(max_length_gap=0)) == []
    wide = _texts_pairs(texts, scores, PairRule(max_length_gap=3, mode="all"))
    assert sorted(r["id"] for r in wide) == ["clip0:0>1", "clip0:0>2", "clip0:2>1"]
    assert length_stats(wide) == {"chosen_shorter": 3, "chosen_longer": 0, "chosen_same_length": 0,
                                  "mean_sentence_gap": (-3 - 1 - 2) / 3}
    assert PairRule.from_config({"mrdpo": {"pair_rule": "dominance", "max_length_gap": 2}}).max_length_gap == 2
    assert PairRule.from_config({"pair_rule": "total"}).max_length_gap == -1
    stats = pair_stats([ITEM], [[Sample(t) for t in texts]], [scores], [free])
    assert (stats["chosen_shorter"], stats["chosen_longer"], stats["mean_sentence_gap"]) == (1, 0, -3)
