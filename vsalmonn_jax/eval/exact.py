"""The `exact` judge for the synthetic data set: parse captions with the event grammar and compare keys.

A parsed event equal to an unmatched ground-truth event is correct; then one with the same (time,
modality) as a still-unmatched event but another subject / action makes that event incorrect; every
other parsed event and every sentence outside the grammar is hallucinated; the rest are missed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from vsalmonn_jax.data import synthetic_scene
from vsalmonn_jax.data.event_grammar import event_key, parse_caption, render_event
from vsalmonn_jax.eval.judge import Judge, check_pairs
from vsalmonn_jax.eval.metrics import VideoScore
from vsalmonn_jax.eval.records import is_synthetic_event


def build_vocabulary(event_lists: Iterable[Sequence[Mapping]]) -> dict[str, dict[str, str]]:
    """action -> {"modality": ...} from ground-truth events; an action with two modalities is an error."""
    vocabulary: dict[str, dict[str, str]] = {}
    for events in event_lists:
        for event in events:
            action, modality = event["action"], event["modality"]
            known = vocabulary.setdefault(action, {"modality": modality})
            if known["modality"] != modality:
                raise ValueError(f"action {action!r} appears with modalities {known['modality']!r} "
                                 f"and {modality!r}: the exact judge cannot parse it unambiguously")
    return vocabulary


def _pick_incorrect(parsed: Mapping, candidates: list[int], events: Sequence[Mapping]) -> int:
    """Among unmatched events at the same (time, modality), prefer one sharing subject or action."""
    for index in candidates:
        if events[index]["subject"] == parsed["subject"] or events[index]["action"] == parsed["action"]:
            return index
    return candidates[0]


def score_events(caption: str, events: Sequence[Mapping], vocabulary: Mapping) -> VideoScore:
    for index, event in enumerate(events):
        if not is_synthetic_event(event):
            raise ValueError(f"exact judge: events[{index}] = {event!r} is not a synthetic event "
                             "(needs time, modality, subject, action); use the embedding or llm judge")
    parsed, unparsed = parse_caption(caption, vocabulary)
    labels = ["missed"] * len(events)
    open_by_key: dict[tuple, list[int]] = {}
    for index, event in enumerate(events):
        open_by_key.setdefault(event_key(event), []).append(index)
    leftovers = []
    for item in parsed:  # pass 1: exact matches
        slots = open_by_key.get(event_key(item))
        if slots:
            labels[slots.pop(0)] = "correct"
        else:
            leftovers.append(item)
    incorrect, hallucinated = [], []
    for item in leftovers:  # pass 2: same (time, modality), wrong subject / action
        candidates = [i for i, e in enumerate(events) if labels[i] == "missed"
                      and (int(e["time"]), e["modality"]) == (item["time"], item["modality"])]
        if candidates:
            index = _pick_incorrect(item, candidates, events)
            labels[index] = "incorrect"
            incorrect.append({"event": render_event(events[index]), "caption": render_event(item)})
        else:
            hallucinated.append(render_event(item))
    hallucinated += unparsed
    missed = [render_event(e) for e, label in zip(events, labels, strict=True) if label == "missed"]
    return VideoScore(num_events=len(events), missed=len(missed), incorrect=len(incorrect),
                      hallucinated=len(hallucinated), missed_events=missed,
                      incorrect_events=incorrect, hallucinated_sentences=hallucinated,
                      event_labels=labels, details={"unparsed_sentences": len(unparsed)})


class ExactJudge(Judge):
    """Vocabulary = the generator's (data/synthetic_scene.py), then actions seen in the ground truth
    being scored, then `vocabulary` (later ones win)."""

    name = "exact"

    def __init__(self, vocabulary: Mapping | None = None):
        self.vocabulary = dict(vocabulary or {})

    @classmethod
    def from_config(cls, config=None, vocabulary: Mapping | None = None) -> ExactJudge:
        return cls(vocabulary)

    def score_many(self, pairs, ids=None) -> list[VideoScore]:
        ids = check_pairs(pairs, ids)
        synthetic = [[e for e in events if is_synthetic_event(e)] for _, events in pairs]
        vocabulary = {**synthetic_scene.vocabulary(), **build_vocabulary(synthetic), **self.vocabulary}
        scores = []
        for video_id, (caption, events) in zip(ids, pairs, strict=True):
            try:
                score = score_events(caption, events, vocabulary)
            except ValueError as err:
                raise ValueError(f"video {video_id!r}: {err}") from None
            score.id = video_id
            scores.append(score)
        return scores

    def describe(self) -> dict:
        return {"judge": self.name, "vocabulary_size": len(self.vocabulary)}
