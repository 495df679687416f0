"""The SFT annotator as data config (data/annotator.py): the realistic annotator's omission and false-event
rates match its config on a generated set (within sampling error); biased stays the old annotator."""

import math

import numpy as np
import pytest

from vsalmonn_jax.data import synthetic_scene as sc
from vsalmonn_jax.data.annotator import (
    KINDS,
    annotated_caption,
    annotated_events,
    annotation_counts,
    annotator_scales,
    default_annotator,
)
from vsalmonn_jax.eval import get_judge

CLIPS = 1500


def _totals(annotator, clips=CLIPS, seed=5):
    scenes = [sc.make_scene(seed, i) for i in range(clips)]
    total = {"events": dict.fromkeys(KINDS, 0), "omitted": dict.fromkeys(KINDS, 0), "false": 0,
             "written": 0}
    for scene in scenes:
        counts = annotation_counts(scene.events, annotated_events(scene, seed, annotator))
        for key in ("events", "omitted"):
            for kind in KINDS:
                total[key][kind] += counts[key][kind]
        total["false"] += counts["false"]
        total["written"] += counts["written"]
    return scenes, total


def _within(observed: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    """observed / n vs p: binomial sampling error (per-annotator rates only widen it a little)."""
    return abs(observed / n - p) <= sigmas * math.sqrt(max(p * (1 - p), 1e-12) / n) + 1e-12


def test_annotator_scales_average_one():
    np.testing.assert_allclose(annotator_scales(5, 0.5), [0.5, 0.75, 1.0, 1.25, 1.5])
    assert annotator_scales(1, 0.9).tolist() == [1.0]
    assert annotator_scales(4, 0.3).mean() == pytest.approx(1.0)


def test_realistic_rates_match_config():
    annotator = default_annotator()
    annotator.omit.update(dict(appears=0.2, vanishes=0.35, moves=0.0, turns=0.5, sounds=0.1))
    annotator.false_rate = 0.15
    _, total = _totals(annotator)
    for kind in KINDS:
        n, p = total["events"][kind], annotator.omit[kind]
        assert n > 200, kind
        assert _within(total["omitted"][kind], n, p), (kind, total["omitted"][kind] / n, p)
    assert total["omitted"]["moves"] == 0
    n_true = sum(total["events"].values())
    assert _within(total["false"], n_true, annotator.false_rate), total["false"] / n_true
    # no "more sentences than events" habit: fewer sentences than true events in all
    assert total["written"] < n_true


def test_rates_can_fail():
    """The check sees a wrong rate: the realistic annotator at omit 0.2 is not at 0.3."""
    annotator = default_annotator()
    annotator.omit.update(dict(appears=0.2, vanishes=0.2, moves=0.2, turns=0.2, sounds=0.2))
    _, total = _totals(annotator)
    assert not _within(total["omitted"]["appears"], total["events"]["appears"], 0.3)


def test_false_events_are_hallucinations_and_omissions_are_misses():
    """Under the exact judge the realistic caption has no incorrect events: omitted = missed,
    false events = hallucinated (they sit at seconds without a true event of their modality)."""
    annotator = default_annotator()
    annotator.false_rate = 0.3
    scenes = [sc.make_scene(1, i) for i in range(200)]
    captions = [annotated_caption(s, 1, annotator) for s in scenes]
    scores = get_judge("exact").score_many([(c, s.events) for c, s in zip(captions, scenes, strict=True)])
    for scene, score in zip(scenes, scores, strict=True):
        counts = annotation_counts(scene.events, annotated_events(scene, 1, annotator))
        assert score.incorrect == 0
        assert score.missed == sum(counts["omitted"].values())
        assert score.hallucinated == counts["false"]
    assert sum(s.hallucinated for s in scores) > 0 and sum(s.missed for s in scores) > 0


def test_deterministic_and_biased_is_the_old_annotator():
    annotator = default_annotator()
    scene = sc.make_scene(3, 11)
    assert annotated_events(scene, 3, annotator) == annotated_events(sc.make_scene(3, 11), 3, annotator)
    annotator.kind = "biased"
    for i in range(20):
        scene = sc.make_scene(3, i)
        assert annotated_caption(scene, 3, annotator) == sc.biased_caption(scene, 3)
    annotator.kind = "bogus"
    with pytest.raises(ValueError, match="realistic"):
        annotated_events(scene, 3, annotator)
