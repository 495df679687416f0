"""The demo's QA (data/event_qa.py): answers depend on the clip. An oracle that reads the clip's events
answers every question; the same oracle reading another clip's events (shuffled media) is at chance;
the options' text alone does not single the answer out (same time and action, the four shapes once
each), and a blind scorer with the text prior of the ground truth (sentence frequencies over other
clips, what a caption LM learns without media) is at chance."""

import collections
import math

import numpy as np

from vsalmonn_jax.data import synthetic_scene as sc
from vsalmonn_jax.data.annotator import event_kind
from vsalmonn_jax.data.event_grammar import render_event
from vsalmonn_jax.data.event_qa import QA_KINDS, event_qa_items, event_qa_prompt

CLIPS = 600


def _oracle(question: dict, events: list[dict], rng) -> int:
    """The option that is one of `events` (the clip's ground truth), else a uniform guess."""
    said = {render_event(e) for e in events}
    hits = [k for k, o in enumerate(question["options"]) if o in said]
    return hits[0] if hits else int(rng.integers(len(question["options"])))


def _questions():
    scenes = [sc.make_scene(9, i) for i in range(CLIPS)]
    return scenes, [event_qa_items(s, 9, 2) for s in scenes]


def test_answers_depend_on_the_clip():
    scenes, questions = _questions()
    rng = np.random.default_rng(0)
    own = [_oracle(q, s.events, rng) == q["answer"] for s, qs in zip(scenes, questions) for q in qs]
    shift = [scenes[(i + 1) % len(scenes)] for i in range(len(scenes))]   # media shuffled across clips
    other = [_oracle(q, s.events, rng) == q["answer"] for s, qs in zip(shift, questions) for q in qs]
    n = len(own)
    assert n > 800 and all(own)
    assert abs(np.mean(other) - 0.25) < 5 * math.sqrt(0.25 * 0.75 / n), np.mean(other)


def test_options_differ_only_in_the_subject():
    scenes, questions = _questions()
    answers = collections.Counter()
    for scene, qs in zip(scenes, questions):
        true = {render_event(e) for e in scene.events}
        for q in qs:
            options = q["options"]
            assert len(set(options)) == 4 and sum(o in true for o in options) == 1
            assert options[q["answer"]] in true and q["kind"] in QA_KINDS
            t = q["question"].split()[-2]   # "What happens at <t> s?"
            assert all(o.startswith(f"At {t} s, the ") for o in options)
            words = [o.split() for o in options]
            assert sorted(w[5] for w in words) == sorted(sc.SHAPES)          # each shape once
            assert len({" ".join(w[6:]) for w in words}) == 1                  # one action
            if q["kind"] == "turns":                                           # no "red X turns red"
                assert all(w[4] != w[-1].rstrip(".") for w in words)
            assert options[q["answer"]] in event_qa_prompt(q["question"], options)
            answers[q["answer"]] += 1
    assert min(answers.values()) > 0.2 * sum(answers.values())   # answer letters near uniform


def test_a_blind_text_prior_is_at_chance():
    _, questions = _questions()
    prior = collections.Counter(render_event(e) for i in range(3000)
                                for e in sc.make_scene(9, sc.SPLIT_BASE["train"] + 10_000 + i).events)
    rng = np.random.default_rng(1)
    right = []
    for q in (q for qs in questions for q in qs):
        counts = np.asarray([prior[o] for o in q["options"]], float) + rng.random(4) * 1e-3   # ties: random
        right.append(int(np.argmax(counts)) == q["answer"])
    n = len(right)
    assert abs(np.mean(right) - 0.25) < 5 * math.sqrt(0.25 * 0.75 / n), np.mean(right)


def test_only_perceived_kinds_are_asked_and_deterministic():
    scenes, questions = _questions()
    kinds = collections.Counter(q["kind"] for qs in questions for q in qs)
    assert set(kinds) == set(QA_KINDS)
    assert event_qa_items(scenes[3], 9, 2) == questions[3]
    visual = collections.Counter(event_kind(e) for s in scenes for e in s.events)
    assert visual["moves"] > 0 and "moves" not in kinds   # asked only about perceived kinds
