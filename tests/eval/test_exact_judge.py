"""The exact judge: round trip of the synthetic generator's captions, each error kind by hand."""

import pytest

from vsalmonn_jax.data import synthetic_scene
from vsalmonn_jax.data.event_grammar import render_caption, render_event
from vsalmonn_jax.eval.exact import ExactJudge, build_vocabulary
from vsalmonn_jax.eval.judge import get_judge
from vsalmonn_jax.eval.metrics import aggregate


def ev(time, modality, subject, action):
    return {"time": time, "modality": modality, "subject": subject, "action": action}


EVENTS = [ev(0, "visual", "the red circle", "appears"),
          ev(1, "visual", "the red circle", "moves left"),
          ev(1, "audio", "a low beep", "sounds"),
          ev(3, "visual", "the blue square", "turns green")]


def test_generator_captions_round_trip():
    cfg = synthetic_scene.default_config()
    scenes = [synthetic_scene.make_scene(7, i, cfg) for i in range(40)]
    judge = get_judge("exact", vocabulary=synthetic_scene.vocabulary())
    scores = judge.score_many([(synthetic_scene.reference_caption(s), s.events) for s in scenes],
                              ids=[f"clip{i}" for i in range(40)])
    assert sum(len(s.events) for s in scenes) == aggregate(scores)["events"] > 40
    for scene, score in zip(scenes, scores, strict=True):
        assert (score.missed, score.incorrect, score.hallucinated) == (0, 0, 0)
        assert score.event_labels == ["correct"] * len(scene.events)
    # the biased annotator's captions: every deviation shows up as an error, none are invented
    biased = judge.score_many([(synthetic_scene.biased_caption(s, 7, cfg), s.events) for s in scenes])
    for scene, score in zip(scenes, biased, strict=True):
        written = synthetic_scene.biased_events(scene, 7, cfg)
        kept = [e for e in scene.events if e in written]
        # each unwritten event is missed, unless an extra sentence took its (time, modality) slot
        # (then incorrect); every extra sentence (false sound, repeat) is incorrect or hallucinated
        assert score.missed + score.incorrect == len(scene.events) - len(kept)
        assert score.incorrect + score.hallucinated == len(written) - len(kept)
    assert sum(s.missed for s in biased) > 0 and sum(s.hallucinated for s in biased) > 0


def test_each_error_kind():
    vocab = build_vocabulary([EVENTS])
    caption = render_caption([
        EVENTS[0],
        ev(1, "visual", "the green cross", "moves left"),   # wrong subject at (1, visual): incorrect
        ev(5, "audio", "a high beep", "sounds"),             # nothing at 5 s: hallucinated
        EVENTS[0],                                           # duplicate: hallucinated
    ]) + " The camera shakes."                               # outside the grammar: hallucinated
    score = ExactJudge(vocab).score(caption, EVENTS, video_id="v")
    assert score.id == "v" and score.num_events == 4
    assert (score.missed, score.incorrect, score.hallucinated) == (2, 1, 3)
    assert score.event_labels == ["correct", "incorrect", "missed", "missed"]
    assert score.incorrect_events == [{"event": render_event(EVENTS[1]),
                                       "caption": "At 1 s, the green cross moves left."}]
    assert score.hallucinated_sentences == ["At 5 s, a high beep sounds.", render_event(EVENTS[0]),
                                            "The camera shakes."]
    assert score.missed_events == [render_event(EVENTS[2]), render_event(EVENTS[3])]


def test_a_repeated_statement_never_takes_another_events_slot():
    """A second copy of a correct sentence described no other event: it was scored 'incorrect' on a
    still-missed event at the same second and modality (cutting Miss, adding no hallucination),
    but hallucinated when no such event existed. Now hallucinated either way."""
    events = [ev(3, "visual", "the red circle", "appears"), ev(3, "visual", "the blue square", "vanishes")]
    once = ExactJudge().score_many([(render_caption([events[0]]), events)])[0]
    twice = ExactJudge().score_many([(render_caption([events[0], events[0]]), events)])[0]
    assert (once.missed, once.incorrect, once.hallucinated) == (1, 0, 0)
    assert (twice.missed, twice.incorrect, twice.hallucinated) == (1, 0, 1)
    assert twice.event_labels == ["correct", "missed"]


def test_exact_match_wins_over_earlier_near_miss():
    # the wrong sentence comes first; the right one still matches, the wrong one is hallucinated
    caption = render_caption([ev(1, "visual", "the green cross", "moves left"), EVENTS[1]])
    score = ExactJudge().score_many([(caption, EVENTS)])[0]
    assert score.event_labels == ["missed", "correct", "missed", "missed"]
    assert score.hallucinated == 1 and score.incorrect == 0


def test_vocabulary_comes_from_the_whole_file():
    # "wobbles" is not in the generator's vocabulary: only another video's ground truth teaches it
    other = [ev(2, "visual", "the red circle", "wobbles")]
    caption = render_caption([ev(3, "visual", "the blue square", "wobbles")])
    alone = ExactJudge().score_many([(caption, EVENTS)])[0]
    together = ExactJudge().score_many([(caption, EVENTS), ("", other)])[0]
    assert (alone.incorrect, alone.hallucinated) == (0, 1)        # unknown action: unparsed
    assert (together.incorrect, together.hallucinated) == (1, 0)  # parsed: wrong action at (3, visual)
    passed_in = ExactJudge({"wobbles": {"modality": "visual"}}).score(caption, EVENTS)
    assert passed_in.incorrect == 1
    # the generator's own actions are known without any ground truth using them
    known = render_caption([ev(3, "visual", "the blue square", "vanishes")])
    assert ExactJudge().score(known, EVENTS).incorrect == 1


def test_errors_are_named():
    with pytest.raises(ValueError, match="video 'bad'.*not a synthetic event"):
        ExactJudge().score_many([("At 1 s, x y.", ["a string event"])], ids=["bad"])
    with pytest.raises(ValueError, match="two modalities|modalities"):
        build_vocabulary([[ev(1, "visual", "a", "sounds"), ev(2, "audio", "b", "sounds")]])
    with pytest.raises(ValueError, match="unknown judge 'fuzzy'"):
        get_judge("fuzzy")


def test_free_text_caption_is_refused_not_scored():
    """A good free-text caption got 183 % Total (every sentence hallucinated): refused in eval mode."""
    caption = "A red circle shows up at the start. Later a high beep can be heard."
    events = [ev(0, "visual", "the red circle", "appears"), ev(1, "audio", "a high beep", "sounds")]
    counted = ExactJudge().score(caption, events)          # the mrDPO / demo policy: hallucinated
    assert (counted.missed, counted.hallucinated, counted.failed) == (2, 2, False)
    refused = ExactJudge(free_text="refuse").score(caption, events, "v9")
    assert refused.failed and refused.details["unparsed_sentences"] == 2
    assert "free-text caption: none of its 2 sentence(s) is in the synthetic grammar" in refused.error
    assert "use --judge embedding or --judge llm" in refused.error
    # a grammar caption with one stray sentence is scored; the stray sentence is reported
    mixed = ExactJudge(free_text="refuse").score(render_caption(events) + " Nice video.", events)
    assert not mixed.failed and (mixed.missed, mixed.hallucinated) == (0, 1)
    agg = aggregate([refused, mixed])
    assert agg["unparsed_sentences"] == 1 and agg["failed_ids"] == ["v9"]
    with pytest.raises(ValueError, match="free_text must be one of"):
        ExactJudge(free_text="maybe")
