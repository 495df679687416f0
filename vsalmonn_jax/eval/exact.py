"""The `exact` judge for the synthetic data set: parse captions with the event grammar and compare keys.

A parsed event equal to an unmatched ground-truth event is correct; then one with the same (time,
modality) as a still-unmatched event but another subject / action makes that event incorrect (a
repeat of a statement already counted correct never does: it is hallucinated, as every other
parsed event and every sentence outside the grammar); the rest are missed.
Free text is not scored as if it were the grammar: ground-truth events that are not structured raise
ValueError, and with `free_text="refuse"` (the `eval` command) a caption none of whose sentences
parses is returned failed with the reason instead of as 100 % missed + every sentence hallucinated.
The per-video `details["unparsed_sentences"]` are summed in the aggregate's `unparsed_sentences`.
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


FREE_TEXT_POLICIES = ("count", "refuse")


def score_events(caption: str, events: Sequence[Mapping], vocabulary: Mapping,
                 free_text: str = "count") -> VideoScore:
    for index, event in enumerate(events):
        if not is_synthetic_event(event):
            raise ValueError(f"exact judge: events[{index}] = {event!r} is not a synthetic event "
                             "(needs time, modality, subject, action); free-text ground truth is "
                             "scored by --judge embedding or --judge llm")
    parsed, unparsed = parse_caption(caption, vocabulary)
    if free_text == "refuse" and unparsed and not parsed:
        return VideoScore(num_events=len(events), failed=True,
                          error=f"free-text caption: none of its {len(unparsed)} sentence(s) is in "
                          "the synthetic grammar ('At <t> s, <subject> <action>.'), so the exact "
                          "judge cannot score it; use --judge embedding or --judge llm",
                          details={"unparsed_sentences": len(unparsed)})
    labels = ["missed"] * len(events)
    open_by_key: dict[tuple, list[int]] = {}
    for index, event in enumerate(events):
        open_by_key.setdefault(event_key(event), []).append(index)
    leftovers, matched = [], set()
    for item in parsed:  # pass 1: exact matches
        slots = open_by_key.get(event_key(item))
        if slots:
            labels[slots.pop(0)] = "correct"
            matched.add(event_key(item))
        else:
            leftovers.append(item)
    incorrect, hallucinated = [], []
    for item in leftovers:  # pass 2: same (time, modality), wrong subject / action
        if event_key(item) in matched:   # a repeat of a statement already counted correct: it
            hallucinated.append(render_event(item))   # describes no other event
            continue
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
    being scored, then `vocabulary` (later ones win). `free_text`: "count" (a caption outside the
    grammar is all hallucinated: judging a grammar-trained model's own samples, as mrDPO and the
    demo do) or "refuse" (such a caption is a failed score naming why: the `eval` command)."""

    name = "exact"

    def __init__(self, vocabulary: Mapping | None = None, free_text: str = "count"):
        if free_text not in FREE_TEXT_POLICIES:
            raise ValueError(f"exact judge free_text must be one of {FREE_TEXT_POLICIES}, got {free_text!r}")
        self.vocabulary, self.free_text = dict(vocabulary or {}), free_text

    @classmethod
    def from_config(cls, config=None, vocabulary: Mapping | None = None,
                    free_text: str = "count") -> ExactJudge:
        return cls(vocabulary, free_text)

    def score_many(self, pairs, ids=None) -> list[VideoScore]:
        ids = check_pairs(pairs, ids)
        synthetic = [[e for e in events if is_synthetic_event(e)] for _, events in pairs]
        vocabulary = {**synthetic_scene.vocabulary(places=True), **build_vocabulary(synthetic), **self.vocabulary}
        scores = []
        for video_id, (caption, events) in zip(ids, pairs, strict=True):
            try:
                score = score_events(caption, events, vocabulary, self.free_text)
            except ValueError as err:
                raise ValueError(f"video {video_id!r}: {err}") from None
            score.id = video_id
            scores.append(score)
        return scores

    def describe(self) -> dict:
        return {"judge": self.name, "vocabulary_size": len(self.vocabulary), "free_text": self.free_text}
