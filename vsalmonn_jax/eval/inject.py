"""Synthetic captions with injected errors, for testing and benchmarking judges against `exact`.

From a ground-truth event list: drop events (missed), change an event's subject or action at the
same time (incorrect), invent events at other seconds (hallucinated), repeat sentences, and add free
sentences outside the grammar. Deterministic for a given numpy Generator.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from vsalmonn_jax.data import synthetic_scene
from vsalmonn_jax.data.event_grammar import render_caption

FREE_SENTENCES = ("The background stays dark grey throughout.", "The clip ends abruptly.",
                  "Everything happens on a small grid.", "The video is silent at the start.")


@dataclasses.dataclass(frozen=True)
class ErrorRates:
    drop: float = 0.15      # per event
    swap: float = 0.10      # per kept event: another subject or action, same time and modality
    invent: float = 0.10    # per event: one invented event at a random second
    repeat: float = 0.05    # per kept event: the sentence written twice
    free: float = 0.2       # per caption: one sentence outside the grammar


def _other(rng: np.random.Generator, pool: Sequence[str], current: str) -> str:
    choices = [p for p in pool if p != current]
    return choices[int(rng.integers(len(choices)))]


def inject_errors(events: Sequence[Mapping], rng: np.random.Generator,
                  rates: ErrorRates = ErrorRates()) -> str:
    subjects, vocab = synthetic_scene.subjects(), synthetic_scene.vocabulary()
    actions = {m: [a for a, v in vocab.items() if v["modality"] == m] for m in ("visual", "audio")}
    seconds = max([int(e["time"]) for e in events] + [1]) + 1
    written = []
    for event in events:
        if rng.random() < rates.drop:
            continue
        item = {k: event[k] for k in ("time", "modality", "subject", "action")}
        if rng.random() < rates.swap:
            modality = item["modality"]
            if len(actions[modality]) > 1 and rng.random() < 0.5:
                item["action"] = _other(rng, actions[modality], item["action"])
            else:
                item["subject"] = _other(rng, subjects[modality], item["subject"])
        written.append(item)
        if rng.random() < rates.repeat:
            written.append(dict(item))
    for _ in range(int(rng.binomial(len(events), rates.invent))):
        modality = "visual" if rng.random() < 0.6 else "audio"
        written.append({"time": int(rng.integers(seconds)), "modality": modality,
                        "subject": subjects[modality][int(rng.integers(len(subjects[modality])))],
                        "action": actions[modality][int(rng.integers(len(actions[modality])))]})
    written.sort(key=lambda e: e["time"])
    caption = render_caption(written)
    if rng.random() < rates.free:
        caption += " " + FREE_SENTENCES[int(rng.integers(len(FREE_SENTENCES)))]
    return caption


def long_scene_events(seed: int, index: int, num_events: int) -> list[dict]:
    """The first `num_events` ground-truth events of a long synthetic clip (for 30-event videos)."""
    cfg = synthetic_scene.default_config()
    cfg.update(dict(min_seconds=4 * num_events, max_seconds=4 * num_events, max_objects=4))
    events = synthetic_scene.make_scene(seed, index, cfg).events
    if len(events) < num_events:
        raise ValueError(f"clip {index} has {len(events)} events, fewer than {num_events}")
    return events[:num_events]
