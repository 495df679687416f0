"""The synthetic data set's caption grammar: one sentence per event, rendered and parsed exactly.

An event is a dict `{"time": int seconds, "modality": "visual" | "audio", "subject": str,
"action": str}`; its sentence is "At {time} s, {subject} {action}." The `exact` judge scores
captions by parsing them back into events with `parse_caption`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

_SPLIT = re.compile(r"(?<=\.)\s+")


def event_key(event: Mapping) -> tuple[int, str, str, str]:
    return (int(event["time"]), event["modality"], event["subject"], event["action"])


def render_event(event: Mapping) -> str:
    return f"At {int(event['time'])} s, {event['subject']} {event['action']}."


def render_caption(events: Iterable[Mapping]) -> str:
    return " ".join(render_event(e) for e in events)


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SPLIT.split(text.strip()) if s.strip()]


def parse_sentence(sentence: str, vocabulary: Mapping[str, Mapping[str, str]]) -> dict | None:
    """Parse one sentence; `vocabulary` maps action -> {"modality": ...} so the split is unambiguous.

    Returns None for a sentence outside the grammar (the judge counts it as hallucinated).
    """
    body = sentence.strip().rstrip(".")
    match = re.match(r"^At (\d+) s, (.+)$", body)
    if not match:
        return None
    time, rest = int(match.group(1)), match.group(2)
    # the longest known action that ends the sentence wins
    for action in sorted(vocabulary, key=len, reverse=True):
        if rest.endswith(" " + action):
            subject = rest[: -len(action) - 1].strip()
            if subject:
                return {"time": time, "modality": vocabulary[action]["modality"],
                        "subject": subject, "action": action}
    return None


def parse_caption(text: str, vocabulary: Mapping[str, Mapping[str, str]]) -> tuple[list[dict], list[str]]:
    """Caption -> (parsed events in order, sentences that are outside the grammar)."""
    events, unparsed = [], []
    for sentence in split_sentences(text):
        event = parse_sentence(sentence, vocabulary)
        (events.append(event) if event is not None else unparsed.append(sentence))
    return events, unparsed
