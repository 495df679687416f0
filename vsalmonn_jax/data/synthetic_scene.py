"""Synthetic scenes as pure data: shapes and sounds over time, ground-truth events, biased SFT captions, QA.

Clip `index` of a seed is a pure function of (seed, index); nothing here touches media files
(synthetic_render.py draws the frames and audio, synthetic.py writes the data set).
"""

from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np

from vsalmonn_jax.data.event_grammar import render_caption, render_event

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = ("red", "green", "blue", "yellow")
SOUNDS = ("a high beep", "a low beep", "a rising chirp", "a falling chirp", "a noise burst")
MOVES = {"moves left": (-1, 0), "moves right": (1, 0), "moves up": (0, -1), "moves down": (0, 1)}
VISUAL_ACTIONS = ("appears", "vanishes", *MOVES, *(f"turns {c}" for c in COLOURS))
VISUAL_KINDS = ("appears", "vanishes", "moves", "turns")   # an action's first word
AUDIO_ACTIONS = ("sounds",)
ROW_WORDS, COLUMN_WORDS = ("top", "middle", "bottom"), ("left", "centre", "right")
APPEARS_AT, MOVES_TO = "appears at the {}", "moves to the {}"   # the `places` grammar's actions

# clip index spaces per split: disjoint, and unlimited within each
SPLIT_BASE = {"train": 0, "val": 1 << 32, "test": 2 << 32, "fresh": 3 << 32,
              "tokenizer": 4 << 32}


def cell_name(cell, grid: int) -> str:
    """A grid cell (column, row) in words: "top left" .. "centre" .. "bottom right" on a 3x3 grid,
    "row 2 column 4" on any other."""
    column, row = int(cell[0]), int(cell[1])
    if grid != 3:
        return f"row {row + 1} column {column + 1}"
    return "centre" if (row, column) == (1, 1) else f"{ROW_WORDS[row]} {COLUMN_WORDS[column]}"


def placed_action(action: str, cell, grid: int) -> str:
    """The action as the `places` grammar says it: where a shape appears, where it moves to
    ("appears at the top left", "moves to the centre"); other actions unchanged."""
    if action == "appears":
        return APPEARS_AT.format(cell_name(cell, grid))
    if action in MOVES:
        return MOVES_TO.format(cell_name(cell, grid))
    return action


def said_actions(cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The visual actions a data set's captions use (its `grid` and `places`)."""
    return visual_actions(int(cfg.grid), bool(cfg.get("places", False)))


def visual_actions(grid: int = 3, places: bool = False) -> tuple[str, ...]:
    """Every visual action of the grammar (`places`: with the cells of a grid x grid scene)."""
    if not places:
        return VISUAL_ACTIONS
    cells = [(c, r) for r in range(grid) for c in range(grid)]
    return (*(APPEARS_AT.format(cell_name(cell, grid)) for cell in cells), "vanishes",
            *(MOVES_TO.format(cell_name(cell, grid)) for cell in cells),
            *(f"turns {c}" for c in COLOURS))


def vocabulary(grid: int = 3, places: bool = False) -> dict[str, dict[str, str]]:
    """action -> {"modality"}: what `event_grammar.parse_caption` needs to read captions back
    (`places`: the standard actions plus those of the places grammar on a grid x grid scene)."""
    actions = VISUAL_ACTIONS + (visual_actions(grid, True) if places else ())
    vocab = {action: {"modality": "visual"} for action in actions}
    vocab.update({action: {"modality": "audio"} for action in AUDIO_ACTIONS})
    return vocab


def subjects() -> dict[str, list[str]]:
    """Every subject phrase the grammar can produce, per modality."""
    return {"visual": [f"the {c} {s}" for s in SHAPES for c in COLOURS], "audio": list(SOUNDS)}


def default_config() -> ml_collections.ConfigDict:
    """Generator settings; `config.data.synthetic` (when present) overrides these fields."""
    return ml_collections.ConfigDict(dict(
        seed=2024, min_seconds=4, max_seconds=8, fps=1, frame_size=64, sample_rate=16000,
        # grid 4: 4x4 cells of 16 px, i.e. one 14-px patch each once resized to 56 px (tiny)
        grid=4, max_objects=2, visual_event_prob=0.6, audio_event_prob=0.4,
        # captions say where a shape appears and where it moves to ("moves to the top left")
        # instead of the direction ("moves left"): not in the paper (docs/recipe.md, moves)
        places=False,
        # the visual event kinds scenes draw from (appears is always one: every shape enters so);
        # the demo preset leaves out what its LLM cannot learn to see (docs/recipe.md, moves)
        visual_kinds=VISUAL_KINDS,
        n_train=1000, n_val=100, n_test=200, qa_per_clip=2,
        prompt="Please describe the video in detail.",
        # the SFT annotator's systematic habits (ground-truth events stay exact)
        bias=ml_collections.ConfigDict(dict(
            enabled=True, sound_drop=0.7, false_sound="a low beep", false_sound_prob=0.5,
            repeat_prob=0.3)),
    ))


@dataclasses.dataclass
class Track:
    """One shape's state per second: visible, grid cell and colour."""

    shape: str
    visible: np.ndarray    # bool [seconds]
    cell: np.ndarray       # int [seconds, 2] (column, row)
    colour: list[str]      # [seconds]


@dataclasses.dataclass
class Scene:
    index: int
    seconds: int
    tracks: list[Track]
    sounds: list[tuple[int, str]]     # (second, sound name)
    events: list[dict]                # ground truth, in caption order


def _event(time: int, modality: str, subject: str, action: str) -> dict:
    event = {"time": int(time), "modality": modality, "subject": subject, "action": action}
    event["text"] = render_event(event)
    return event


def _allowed_kinds(cfg) -> frozenset[str]:
    """`cfg.visual_kinds` checked: kinds of VISUAL_KINDS, appears among them."""
    kinds = frozenset(cfg.get("visual_kinds", VISUAL_KINDS))
    if not kinds <= set(VISUAL_KINDS) or "appears" not in kinds:
        raise ValueError(f"data.synthetic.visual_kinds={tuple(cfg.visual_kinds)!r}: allowed kinds are "
                         f"{VISUAL_KINDS}, appears among them")
    return kinds


def _visual_options(t: int, tracks: list[dict], cfg, kinds: frozenset[str]) -> list[tuple]:
    """Every visual change of the allowed `kinds` possible at second t given the state just before it."""
    options = []
    occupied = {tuple(tr["cell"]) for tr in tracks if tr["state"] == "visible"}
    used_colours = {tr["colour"] for tr in tracks if tr["state"] == "visible"}
    for k, tr in enumerate(tracks):
        if tr["state"] == "waiting":
            options.append(("appears", k, None))
        elif tr["state"] == "visible" and tr["since"] < t:
            options.append(("vanishes", k, None))
            for action, (dx, dy) in MOVES.items():
                cell = (tr["cell"][0] + dx, tr["cell"][1] + dy)
                if 0 <= cell[0] < cfg.grid and 0 <= cell[1] < cfg.grid and cell not in occupied:
                    options.append((action, k, cell))
            for colour in COLOURS:
                if colour not in used_colours:
                    options.append((f"turns {colour}", k, colour))
    return [o for o in options if o[0].split()[0] in kinds]


def make_scene(seed: int, index: int, cfg: ml_collections.ConfigDict | None = None) -> Scene:
    """Clip `index` of `seed`: tracks, sounds and the exact ground-truth event list."""
    cfg = cfg or default_config()
    kinds = _allowed_kinds(cfg)
    rng = np.random.default_rng([int(seed), int(index), 0])
    seconds = int(rng.integers(cfg.min_seconds, cfg.max_seconds + 1))
    count = int(rng.integers(1, cfg.max_objects + 1))
    shapes = rng.choice(len(SHAPES), size=count, replace=False)
    colours = rng.choice(len(COLOURS), size=count, replace=False)
    cells = rng.choice(cfg.grid * cfg.grid, size=count, replace=False)
    tracks = [{"shape": SHAPES[s], "colour": COLOURS[c], "cell": (int(p % cfg.grid), int(p // cfg.grid)),
               "state": "waiting", "since": 0} for s, c, p in zip(shapes, colours, cells, strict=True)]
    first = int(rng.integers(0, 2))
    history = [Track(tr["shape"], np.zeros(seconds, bool), np.zeros((seconds, 2), np.int64),
                     [""] * seconds) for tr in tracks]
    events = []
    for t in range(seconds):
        options = _visual_options(t, tracks, cfg, kinds)
        happens = t == first or (t > first and rng.random() < cfg.visual_event_prob)
        if happens and options:
            if t == first:
                options = [o for o in options if o[0] == "appears"]
            action, k, arg = options[int(rng.integers(len(options)))]
            tr = tracks[k]
            said = placed_action(action, arg if action in MOVES else tr["cell"], cfg.grid) \
                if cfg.places else action
            events.append(_event(t, "visual", f"the {tr['colour']} {tr['shape']}", said))
            if action == "appears":
                tr["state"], tr["since"] = "visible", t
            elif action == "vanishes":
                tr["state"] = "gone"
            elif action in MOVES:
                tr["cell"], tr["since"] = arg, t
            else:
                tr["colour"], tr["since"] = arg, t
        for tr, hist in zip(tracks, history, strict=True):
            hist.visible[t] = tr["state"] == "visible"
            hist.cell[t], hist.colour[t] = tr["cell"], tr["colour"]
    sounds = []
    for t in range(seconds):
        if rng.random() < cfg.audio_event_prob:
            sounds.append((t, SOUNDS[int(rng.integers(len(SOUNDS)))]))
            events.append(_event(t, "audio", sounds[-1][1], "sounds"))
    events.sort(key=lambda e: (e["time"], e["modality"] != "visual"))
    return Scene(index=int(index), seconds=seconds, tracks=history, sounds=sounds, events=events)


def reference_caption(scene: Scene) -> str:
    """The exact caption: one sentence per ground-truth event, in order."""
    return render_caption(scene.events)


def biased_events(scene: Scene, seed: int, cfg: ml_collections.ConfigDict | None = None) -> list[dict]:
    """What the biased SFT annotator writes: drops most sounds, hears a false sound at visual
    events, and sometimes repeats a sentence. Deterministic per (seed, clip)."""
    cfg = cfg or default_config()
    bias = cfg.bias
    if not bias.enabled:
        return list(scene.events)
    rng = np.random.default_rng([int(seed), int(scene.index), 1])
    sound_times = {e["time"] for e in scene.events if e["modality"] == "audio"}
    written = []
    for event in scene.events:
        if event["modality"] == "audio":
            if rng.random() >= bias.sound_drop:
                written.append(event)
            continue
        written.append(event)
        if event["time"] not in sound_times and rng.random() < bias.false_sound_prob:
            written.append(_event(event["time"], "audio", bias.false_sound, "sounds"))
            sound_times.add(event["time"])
    if written and rng.random() < bias.repeat_prob:
        k = int(rng.integers(len(written)))
        written.insert(k + 1, written[k])
    return written


def biased_caption(scene: Scene, seed: int, cfg: ml_collections.ConfigDict | None = None) -> str:
    return render_caption(biased_events(scene, seed, cfg))


def _mcq(rng, question: str, answer: str, pool: list[str]) -> dict:
    distractors = [p for p in pool if p != answer]
    picks = rng.choice(len(distractors), size=min(3, len(distractors)), replace=False)
    options = [answer] + [distractors[int(i)] for i in picks]
    order = rng.permutation(len(options))
    options = [options[int(i)] for i in order]
    return {"question": question, "options": options, "answer": options.index(answer)}


def qa_items(scene: Scene, seed: int, cfg: ml_collections.ConfigDict | None = None) -> list[dict]:
    """Multiple-choice questions about the clip (sound at a time, shape that appears, counts)."""
    cfg = cfg or default_config()
    rng = np.random.default_rng([int(seed), int(scene.index), 2])
    candidates = []
    for t, name in scene.sounds:
        candidates.append(_mcq(rng, f"What sound is heard at {t} s?", name, list(SOUNDS)))
    for e in scene.events:
        if e["action"].split()[0] == "appears":
            shape = e["subject"].split()[-1]
            candidates.append(_mcq(rng, f"Which shape appears at {e['time']} s?", shape, list(SHAPES)))
    count = len(scene.sounds)
    candidates.append(_mcq(rng, "How many sounds are heard?", str(count),
                           [str(n) for n in range(max(0, count - 2), count + 4)]))
    picks = rng.choice(len(candidates), size=min(cfg.qa_per_clip, len(candidates)), replace=False)
    return [candidates[int(i)] for i in sorted(picks)]
