"""The SFT annotator as data config (`demo.annotator`): `realistic` omits a share of the true events per
kind and adds a smaller rate of plausible false events, rates varying per annotator; `biased` is the old one.

Pure functions of (scene, seed, config); ground-truth events stay exact. `realistic` per clip: one of
`annotators` annotators (uniform), whose rates are the configured ones times 1 + spread * u, u evenly
spaced in [-1, 1] (mean 1: over many clips the rates are the configured ones); each true event of
kind K is left out with probability omit.K; each true event adds, with probability false_rate, one
false event at a (second, modality) free of true events (a shape of the clip or a sound), so the
exact judge counts it as a hallucination. No habit of writing more sentences than there are events.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from vsalmonn_jax.data import synthetic_scene as scene_lib
from vsalmonn_jax.data.event_grammar import event_key, render_caption

KINDS = ("appears", "vanishes", "moves", "turns", "sounds")
ANNOTATOR_KINDS = ("realistic", "biased")


def event_kind(event) -> str:
    """sounds (every audio event), else the visual action's first word: appears / vanishes / moves / turns."""
    return "sounds" if event["modality"] == "audio" else str(event["action"]).split()[0]


def default_annotator() -> ml_collections.ConfigDict:
    """`demo.annotator`: omission shares only on kinds the pretrained demo model perceives (appears,
    vanishes, turns: docs/recipe.md); moves and sounds are kept (the model cannot learn them back)."""
    return ml_collections.ConfigDict(dict(
        kind="realistic",
        omit=ml_collections.ConfigDict(dict(appears=0.3, vanishes=0.3, moves=0.0, turns=0.3, sounds=0.0)),
        false_rate=0.1, annotators=5, spread=0.5))


def annotator_scales(annotators: int, spread: float) -> np.ndarray:
    """[annotators] rate multipliers 1 + spread * u, u evenly spaced in [-1, 1] (mean exactly 1)."""
    return 1.0 + float(spread) * (np.linspace(-1.0, 1.0, int(annotators)) if annotators > 1 else np.zeros(1))


def _false_event(rng, scene: scene_lib.Scene, taken: set[tuple[int, str]],
                 actions: tuple[str, ...] = scene_lib.VISUAL_ACTIONS) -> dict | None:
    """A plausible false event at a (second, modality) without a true event, or None if none is free."""
    free = [(t, m) for t in range(scene.seconds) for m in ("visual", "audio") if (t, m) not in taken]
    if not free:
        return None
    t, modality = free[int(rng.integers(len(free)))]
    if modality == "audio":
        return scene_lib._event(t, "audio", scene_lib.SOUNDS[int(rng.integers(len(scene_lib.SOUNDS)))],
                                "sounds")
    track = scene.tracks[int(rng.integers(len(scene.tracks)))]
    colour = track.colour[t]   # the shape's colour at that second (plausible even if not visible)
    action = actions[int(rng.integers(len(actions)))]
    return scene_lib._event(t, "visual", f"the {colour} {track.shape}", action)


def realistic_events(scene: scene_lib.Scene, seed: int, annotator: ml_collections.ConfigDict,
                     actions: tuple[str, ...] = scene_lib.VISUAL_ACTIONS) -> list[dict]:
    """What the realistic annotator writes for one clip (events in time order; false visual events
    draw from `actions`, the data set's grammar). Deterministic per (seed, clip)."""
    rng = np.random.default_rng([int(seed), int(scene.index), 3])
    scale = annotator_scales(int(annotator.annotators), float(annotator.spread))[
        int(rng.integers(int(annotator.annotators)))]
    taken = {(int(e["time"]), e["modality"]) for e in scene.events}
    written, false = [], []
    for event in scene.events:
        if rng.random() >= min(1.0, float(annotator.omit[event_kind(event)]) * scale):
            written.append(event)
        if rng.random() < min(1.0, float(annotator.false_rate) * scale):
            extra = _false_event(rng, scene, taken, actions)
            if extra is not None:
                taken.add((extra["time"], extra["modality"]))
                false.append(extra)
    return sorted(written + false, key=lambda e: (e["time"], e["modality"] != "visual"))


def annotated_events(scene: scene_lib.Scene, seed: int, annotator: ml_collections.ConfigDict,
                     cfg: ml_collections.ConfigDict | None = None) -> list[dict]:
    """The SFT annotator's events for `annotator.kind` (biased: data.synthetic.bias habits)."""
    if annotator.kind == "biased":
        return scene_lib.biased_events(scene, seed, cfg)
    if annotator.kind == "realistic":
        return realistic_events(scene, seed, annotator,
                                scene_lib.said_actions(cfg or scene_lib.default_config()))
    raise ValueError(f"demo.annotator.kind must be one of {ANNOTATOR_KINDS}, got {annotator.kind!r}")


def annotated_caption(scene, seed: int, annotator, cfg=None) -> str:
    return render_caption(annotated_events(scene, seed, annotator, cfg))


def annotation_counts(truth: list[dict], written: list[dict]) -> dict:
    """Per kind: true events and how many of them the annotation left out; false = written events
    that are no true event. {"events": {kind: n}, "omitted": {kind: n}, "false": n, "written": n}."""
    keys = {event_key(e) for e in written}
    true_keys = {event_key(e) for e in truth}
    events, omitted = dict.fromkeys(KINDS, 0), dict.fromkeys(KINDS, 0)
    for event in truth:
        events[event_kind(event)] += 1
        omitted[event_kind(event)] += event_key(event) not in keys
    return {"events": events, "omitted": omitted, "written": len(written),
            "false": sum(event_key(e) not in true_keys for e in written)}
