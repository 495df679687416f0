"""The embedding judge with the packaged all-MiniLM-L6-v2: identity, empty, unrelated, incorrect rules."""

import numpy as np
import pytest

from vsalmonn_jax.eval.embedding import EmbeddingJudge, EmbeddingOptions, MatchInput, assign, decide
from vsalmonn_jax.eval.judge import get_judge

EVENTS = ["A man in a red shirt opens the front door.",
          "A dog barks twice.",
          "Heavy rain falls on the roof.",
          "A woman says 'good morning' to the man.",
          "A church bell rings in the distance."]


@pytest.fixture(scope="module")
def judge():
    return get_judge("embedding")


def test_caption_equal_to_events(judge):
    score = judge.score(" ".join(EVENTS), EVENTS)
    assert (score.missed, score.hallucinated, score.incorrect) == (0, 0, 0)
    assert score.event_labels == ["correct"] * 5
    assert all(m["cosine"] > 0.99 for m in score.details["matches"])


def test_empty_caption_misses_everything(judge):
    score = judge.score("", EVENTS)
    assert (score.missed, score.hallucinated, score.incorrect) == (5, 0, 0)
    assert score.missed_events == EVENTS


def test_unrelated_caption_is_hallucinated_and_misses(judge):
    caption = ("The stock market fell sharply on Tuesday. A chef slices onions in a bright kitchen. "
               "Two astronauts float inside the space station.")
    score = judge.score(caption, EVENTS)
    assert (score.missed, score.hallucinated, score.incorrect) == (5, 3, 0)


def test_paraphrase_and_contradictions(judge):
    caption = ("A man wearing a red shirt opens the front door. A dog barks. "
               "Heavy rain does not fall on the roof. At 9 s a bell rings.")
    events = EVENTS[:3] + ["At 2 s a bell rings."]
    score = judge.score(caption, events)
    labels = dict(zip(events, score.event_labels, strict=True))
    assert labels[EVENTS[0]] == "correct"
    assert labels[EVENTS[1]] in ("correct", "incorrect")       # "barks" vs "barks twice"
    assert labels[EVENTS[2]] == "incorrect"                     # negated on one side only
    assert labels["At 2 s a bell rings."] == "missed"           # 9 s vs 2 s: never paired
    assert score.hallucinated_sentences == ["At 9 s a bell rings."]
    as_incorrect = judge.with_options(number_rule="incorrect").score(caption, events)
    assert as_incorrect.event_labels[3] == "incorrect" and as_incorrect.hallucinated == 0


def test_synthetic_events_are_read_through_their_text(judge):
    events = [{"time": 1, "modality": "visual", "subject": "the red circle", "action": "appears"},
              {"time": 2, "modality": "audio", "subject": "a low beep", "action": "sounds"}]
    score = judge.score("At 1 s, the red circle appears. At 2 s, a low beep sounds.", events)
    assert (score.missed, score.incorrect, score.hallucinated) == (0, 0, 0)


def test_assignment_and_cover_rules_on_fixed_similarities():
    # 2 units x 3 events; greedy would give unit 0 to event 0 and lose a pair
    sim = np.array([[0.90, 0.85, 0.10],
                    [0.88, 0.20, 0.10]], np.float32)
    inp = MatchInput(["u0", "u1"], ["e0", "e1", "e2"], sim, np.zeros((2, 3), bool),
                     np.zeros((2, 3), bool))
    assert sorted(assign(inp, 0.5, "unmatched")) == [(0, 1), (1, 0)]
    score = decide(inp, EmbeddingOptions(correct_threshold=0.86, cover_threshold=0.0))
    assert score.event_labels == ["correct", "incorrect", "missed"]
    covered = decide(MatchInput(["u0"], ["e0", "e1"], np.array([[0.95, 0.9]], np.float32),
                                np.zeros((1, 2), bool), np.zeros((1, 2), bool)),
                     EmbeddingOptions(cover_threshold=0.85))
    assert covered.event_labels == ["correct", "correct"] and covered.details["covered_events"] == 1
    # units: a second clause restating the event is supported; a verbatim repeat stays hallucinated
    inp = MatchInput(["u0", "u1", "u0 again"], ["e0"], np.array([[0.9], [0.7], [0.9]], np.float32),
                     np.zeros((3, 1), bool), np.zeros((3, 1), bool), np.array([False, False, True]))
    units = decide(inp, EmbeddingOptions(cover_threshold=0.65))
    assert units.hallucinated_sentences == ["u0 again"] and units.details["supporting_units"] == 1
    assert decide(inp, EmbeddingOptions(cover_threshold=0.0)).hallucinated == 2
    with pytest.raises(ValueError, match="number_rule"):
        EmbeddingOptions(number_rule="maybe")
    with pytest.raises(ValueError, match="match_threshold <= correct_threshold"):
        EmbeddingOptions(match_threshold=0.9, correct_threshold=0.5)


def test_options_come_from_the_eval_config():
    judge = EmbeddingJudge.from_config({"eval": {"embedding_match_threshold": 0.4,
                                                 "embedding_number_rule": "ignore"}})
    assert judge.options.match_threshold == 0.4 and judge.options.number_rule == "ignore"
    from vsalmonn_jax.config import load_config

    config = load_config("tiny", ["--config.eval.embedding_cover_threshold=0.0"])
    assert EmbeddingJudge.from_config(config).options.cover_threshold == 0.0
    assert EmbeddingJudge.from_config(config.eval).options.cover_threshold == 0.0
    with pytest.raises(TypeError, match="unknown options"):
        EmbeddingJudge.from_config(None, threshold=0.3)


def test_calibrate_against_exact_labels_then_use_thresholds(tmp_path, judge, capsys):
    import json

    from vsalmonn_jax import cli
    from vsalmonn_jax.atomic_file import write_jsonl
    from vsalmonn_jax.eval.inject import ErrorRates, inject_errors, long_scene_events

    rng = np.random.default_rng(1)
    events = [long_scene_events(9, i, 12) for i in range(10)]
    rates = ErrorRates(drop=0.2, swap=0.3, invent=0.2, repeat=0.05, free=0.5)
    write_jsonl(tmp_path / "gt.jsonl", [{"id": f"v{i}", "events": e} for i, e in enumerate(events)])
    write_jsonl(tmp_path / "cap.jsonl", [{"id": f"v{i}", "caption": inject_errors(e, rng, rates)}
                                         for i, e in enumerate(events)])
    common = ["--captions", str(tmp_path / "cap.jsonl"), "--gt", str(tmp_path / "gt.jsonl")]
    assert cli.main(["eval", *common, "--judge", "exact", "--out", str(tmp_path / "exact")]) == 0
    assert cli.main(["eval", "calibrate", *common, "--labels", str(tmp_path / "exact" / "per_video.jsonl"),
                     "--out", str(tmp_path / "cal.json")]) == 0
    cal = json.loads((tmp_path / "cal.json").read_text())
    assert cal["videos"] == 10 and cal["events"] == 120 and cal["grid_points"] > 100
    assert cal["agreement"]["objective"] >= cal["current_agreement"]["objective"]
    assert cal["agreement"]["event_agreement"] >= 0.9 and cal["agreement"]["hallucination_agreement"] >= 0.9
    # the default threshold calls most subject swaps "correct"; the fit must separate them
    assert cal["fitted"]["correct_threshold"] > 0.8
    assert "agreement: events" in capsys.readouterr().out
    assert cli.main(["eval", *common, "--judge", "embedding", "--thresholds", str(tmp_path / "cal.json"),
                     "--out", str(tmp_path / "emb")]) == 0
    report = json.loads((tmp_path / "emb" / "report.json").read_text())
    assert report["judge"]["correct_threshold"] == cal["fitted"]["correct_threshold"]


def test_count_only_labels_agreement_by_hand():
    from vsalmonn_jax.eval.calibrate import summarize, video_agreement

    # predicted: 2 correct, 1 missed, 1 incorrect; reference counts: 1 missed, 2 incorrect
    row = video_agreement(["correct", "correct", "missed", "incorrect"], 3,
                          {"missed": 1, "incorrect": 2, "hallucinated": 1, "event_labels": None})
    assert row[:4] == (3, 4, 1, 3)  # histogram overlap min(2,1) + min(1,1) + min(1,2) = 3
    assert row[4:] == ((1, 1, 3), (1, 2, 1))
    both = summarize([row, video_agreement(["missed"], 0, {"missed": 1, "incorrect": 0,
                                                           "hallucinated": 0,
                                                           "event_labels": ["missed"]})])
    assert both["event_agreement"] == 4 / 5 and both["hallucination_agreement"] == 1 / 3
    assert both["objective"] == (4 / 5 + 1 / 3) / 2
    assert both["micro_rates"]["judge_miss"] == 2 / 5 and both["micro_rates"]["labels_incorrect"] == 2 / 5
    assert both["micro_rates"]["judge_hallucination"] == 3 / 5


def test_real_style_paragraph_caption(judge):
    events = ["A woman in a blue dress walks into a kitchen.", "She opens the refrigerator.",
              "She takes out a carton of milk.", "Upbeat piano music plays in the background.",
              "A man enters the kitchen and says 'Good morning'.",
              "The woman smiles and pours milk into a glass.", "A dog barks outside.",
              "The man sits at the table and reads a newspaper."]
    caption = ("The video opens in a bright kitchen where a woman wearing a blue dress walks in and opens "
               "the fridge, taking out a carton of milk. Cheerful piano music can be heard throughout. "
               "A man walks in and greets her with 'Good morning', and she smiles while pouring milk "
               "into a glass. He then sits down at the table and reads the newspaper. "
               "A cat jumps onto the counter.")
    score = judge.score(caption, events)
    labels = dict(zip(events, score.event_labels, strict=True))
    assert labels["A dog barks outside."] == "missed"
    for paraphrased in events[2:6] + events[7:]:
        assert labels[paraphrased] == "correct", paraphrased
    assert score.hallucinated_sentences == ["A cat jumps onto the counter."]
    assert score.missed <= 2 and score.incorrect <= 1  # the two-event opening sentence is the hard part
