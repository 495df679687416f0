"""Multiple-choice questions about what a clip shows, answered by option scoring: "What happens at t s?" with
four event sentences as options, the true one among a 2 x 2 grid of subjects x actions.

The grid {s, s'} x {a, a'} (s, a the true event's subject and action) names each subject and each action
twice, so the text alone does not single the answer out; at most one visual event happens per second,
so no distractor is also true. Only kinds the pretrained demo model perceives are asked (QA_KINDS).
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


def _other(rng, pool, exclude: str) -> str:
    choices = [p for p in pool if p != exclude]
    return choices[int(rng.integers(len(choices)))]


def event_question(rng, scene: scene_lib.Scene, event: dict) -> dict:
    """{"question", "options" [4 sentences], "answer": index, "kind"} about one true visual event."""
    t = int(event["time"])
    shape = event["subject"].split()[-1]
    # the clip's other shape (its colour does not change at t: one visual event per second)
    others = [f"the {tr.colour[t]} {tr.shape}" for tr in scene.tracks if tr.shape != shape]
    subject = (others[int(rng.integers(len(others)))] if others
               else _other(rng, [s for s in scene_lib.subjects()["visual"] if not s.endswith(shape)],
                           event["subject"]))
    colours = {s.split()[1] for s in (event["subject"], subject)}   # no "the red X turns red"
    action = _other(rng, [a for a in scene_lib.VISUAL_ACTIONS if a.split()[-1] not in colours],
                    event["action"])
    grid = [(s, a) for s in (event["subject"], subject) for a in (event["action"], action)]
    order = rng.permutation(len(grid))
    options = [render_event({"time": t, "subject": grid[int(k)][0], "action": grid[int(k)][1]})
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
