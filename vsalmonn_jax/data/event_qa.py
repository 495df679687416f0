"""Multiple-choice questions about what a clip shows, answered by option scoring: "What happens at t s?" with
four event sentences as options that differ only in which shape (and its colour) does the true action.

The options name each of the four shapes once (the true subject, the clip's other shape, the rest with
random colours) at the same time with the same action, so neither the time nor the action nor the
shape gives the answer away: a model blind to the media is at chance (an action-varying grid was not:
a 30-step "pretrained" model that saw nothing scored 41 % on it, from the action's prior at second t).
At most one visual event happens per second, so no distractor is also true. Only kinds the
pretrained demo model perceives are asked (QA_KINDS).
"""

from __future__ import annotations

import numpy as np

from vsalmonn_jax.data import synthetic_scene as scene_lib
from vsalmonn_jax.data.annotator import event_kind
from vsalmonn_jax.data.event_grammar import render_event

QA_KINDS = ("appears", "vanishes", "turns")
INSTRUCTION = "Answer with the right sentence."


def event_qa_prompt(question: str, options: list[str]) -> str:
    """The user text: question, lettered options, instruction (the answer is the option's sentence)."""
    return "\n".join([question] + [f"{chr(65 + i)}. {o}" for i, o in enumerate(options)] + [INSTRUCTION])


def event_question(rng, scene: scene_lib.Scene, event: dict) -> dict:
    """{"question", "options" [4 sentences], "answer": index, "kind"} about one true visual event."""
    t = int(event["time"])
    shape = event["subject"].split()[-1]
    target = event["action"].split()[-1]          # "turns red": no option "the red X turns red"
    colours = [c for c in scene_lib.COLOURS if c != target]
    known = {tr.shape: tr.colour[t] for tr in scene.tracks}   # the clip's shapes at t (one event/s)
    subjects = [event["subject"]]
    for other in scene_lib.SHAPES:
        if other != shape:
            colour = known.get(other)
            if colour not in colours:   # not in the clip (or the turn's target colour): a random one
                colour = colours[int(rng.integers(len(colours)))]
            subjects.append(f"the {colour} {other}")
    order = rng.permutation(len(subjects))
    options = [render_event({"time": t, "subject": subjects[int(k)], "action": event["action"]})
               for k in order]
    return {"question": f"What happens at {t} s?", "options": options,
            "answer": int(np.flatnonzero(order == 0)[0]), "kind": event_kind(event)}


def event_qa_items(scene: scene_lib.Scene, seed: int, per_clip: int, kinds=QA_KINDS) -> list[dict]:
    """Up to `per_clip` questions on distinct true events of `kinds`, in time order; deterministic
    per (seed, clip)."""
    rng = np.random.default_rng([int(seed), int(scene.index), 4])
    eligible = [e for e in scene.events if e["modality"] == "visual" and event_kind(e) in kinds]
    if not eligible:
        return []
    picks = sorted(rng.choice(len(eligible), size=min(per_clip, len(eligible)), replace=False))
    return [event_question(rng, scene, eligible[int(k)]) for k in picks]


def qa_corpus(cfg, count: int = 200) -> list[str]:
    """QA wording for the tokenizer: the prompts of `count` tokenizer-only clips (seed-independent)."""
    out = []
    for i in range(count):
        scene = scene_lib.make_scene(0, scene_lib.SPLIT_BASE["tokenizer"] + i, cfg)
        out += [event_qa_prompt(q["question"], q["options"]) for q in event_qa_items(scene, 0, 2)]
    return out
