"""The demo report's sentences on the run's settings (time tokens, scene kinds, align stage, SFT
annotator): each reads the config and says in words what the run did, naming the config field.
"""

from __future__ import annotations

from vsalmonn_jax.data.synthetic_scene import VISUAL_KINDS


def time_tokens_text(config) -> str:
    """What the report says about per-frame time tokens (data.time_tokens)."""
    mode = str(config.data.get("time_tokens", "none"))
    return {"none": "No per-frame time tokens (data.time_tokens=none).",
            "official": "Per-frame time tokens after each frame of video-only input (the release's "
                        "form, data.time_tokens=official).",
            "all": "Per-frame time tokens (the release form: the end of the frame's share of "
                   "the video) after each frame's visual tokens, audio-visual input included "
                   "(data.time_tokens=all; the release gives them to video without audio only)."
            }[mode]


def scene_kinds_text(config) -> str:
    """What the report says about the scenes' visual event kinds (data.synthetic.visual_kinds)."""
    kinds = tuple(config.data.synthetic.get("visual_kinds", VISUAL_KINDS))
    left = [k for k in VISUAL_KINDS if k not in kinds]
    text = f"Visual events in the scenes: {', '.join(kinds)}"
    if not left:
        return text + "."
    return (text + f" ({' and '.join(left)} left out by data.synthetic.visual_kinds: the demo's "
            "2-layer LLM does not learn to see them within the budget, docs/recipe.md).")


def align_text(config) -> str:
    """The align stage as configured (demo.align_llm)."""
    if not config.demo.get("align_llm", False):
        return "audio connector, audio-only captions"
    return ("audio connector + LLM + vision connector on audio-only captions, the pretraining's "
            "video-only captions replayed half and half; the paper trains the connector alone, "
            "which the frozen 2-layer LLM cannot use: docs/recipe.md")


def annotator_text(config) -> str:
    """One sentence on the SFT annotator of `config.demo.annotator` (data/annotator.py)."""
    annotator = config.demo.get("annotator")
    if annotator is None or annotator.kind == "biased":
        return ("a biased annotator: most sounds dropped, a false 'low beep' at visual events, "
                "repeated sentences")
    omit = ", ".join(f"{k} {100 * float(v):.0f} %" for k, v in annotator.omit.items() if float(v) > 0)
    return (f"a realistic annotator: true events omitted per kind ({omit or 'none'}), "
            f"{100 * float(annotator.false_rate):.0f} false events per 100 true ones at free seconds, "
            f"{int(annotator.annotators)} annotators whose rates vary x(1 +- {float(annotator.spread):g})")
