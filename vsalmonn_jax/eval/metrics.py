"""Caption metrics: per-video event scores, micro / macro aggregates, repeat collapse, repetition.

Micro (the paper's way): Miss = sum M / sum N, Incorrect = sum I / sum N, Hallucination = sum H / sum N,
Total = (M + I + H) / sum N over all events of all scored videos. Macro: the same rates per video
(videos with N > 0), averaged. Failed videos (a judge that could not score them) are listed, never
counted as zero errors.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence

import numpy as np

from vsalmonn_jax.eval.text import normalize, split_sentences, words

# Runaway-repeat rule: a substring of 1-49 chars repeated >= 5 times in a row, or of 50-99 chars
# repeated >= 4 times, is kept once. Copies may be separated by whitespace ("X. X. X.").
# The short rule runs first so that a unit is its shortest period ("X X X X X X X X" is X eight
# times, not "X X" four times).
_REPEAT_RULES = (
    re.compile(r"(\S.{0,48}?)(?:\s*\1){4,}", re.DOTALL),
    re.compile(r"(\S.{49,98}?)(?:\s*\1){3,}", re.DOTALL),
)
LABELS = ("correct", "missed", "incorrect")


def collapse_repeats(text: str) -> str:
    """Keep one copy of each runaway repeat (applied to captions that never emitted an end token)."""
    for _ in range(16):  # each pass strictly shortens the text; a few passes reach the fixed point
        before = text
        for rule in _REPEAT_RULES:
            text = rule.sub(r"\1", text)
        if text == before:
            break
    return text


def seq_rep(text: str, n: int = 4) -> float:
    """seq-rep-n = 1 - unique n-grams / n-grams over lower-cased words (0 when there are none)."""
    tokens = words(text)
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def duplicate_sentences(text: str) -> tuple[int, int]:
    """(sentences that repeat an earlier sentence of the same caption, sentences)."""
    seen, dup, total = set(), 0, 0
    for sentence in split_sentences(text):
        key = normalize(sentence)
        if not key:
            continue
        total += 1
        dup += key in seen
        seen.add(key)
    return dup, total


def repetition_stats(captions: Sequence[str], stopped: Sequence[bool] | None = None) -> dict:
    """seq-rep-4 (mean per caption), duplicate-sentence rate (over all sentences), no-end-token share.

    Computed on the raw captions, before any collapse: this is what the model produced.
    """
    stopped = [True] * len(captions) if stopped is None else list(stopped)
    if len(stopped) != len(captions):
        raise ValueError(f"{len(captions)} captions but {len(stopped)} stopped flags")
    dup = total = 0
    for caption in captions:
        d, t = duplicate_sentences(caption)
        dup, total = dup + d, total + t
    return {
        "captions": len(captions),
        "seq_rep_4": float(np.mean([seq_rep(c, 4) for c in captions])) if captions else 0.0,
        "duplicate_sentence_rate": dup / total if total else 0.0,
        "no_end_token_rate": (sum(not s for s in stopped) / len(stopped)) if stopped else 0.0,
    }


@dataclasses.dataclass
class VideoScore:
    """One video's judgement. Counts may be fractional (median of an even number of LLM passes);
    the lists are empty when an LLM judge's counts came only from its count-only fallback."""

    id: str = ""
    num_events: int = 0
    missed: float = 0
    incorrect: float = 0
    hallucinated: float = 0
    missed_events: list = dataclasses.field(default_factory=list)       # event texts
    incorrect_events: list = dataclasses.field(default_factory=list)    # {"event", "caption"}
    hallucinated_sentences: list = dataclasses.field(default_factory=list)  # caption statements
    event_labels: list | None = None  # per ground-truth event: correct | missed | incorrect
    failed: bool = False
    error: str = ""
    details: dict = dataclasses.field(default_factory=dict)

    @property
    def total(self) -> float:
        return self.missed + self.incorrect + self.hallucinated

    @property
    def correct(self) -> float:
        return self.num_events - self.missed - self.incorrect

    def rate(self, what: str) -> float:
        return (self.total if what == "total" else getattr(self, what)) / max(self.num_events, 1)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> VideoScore:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def _rates(m: float, i: float, h: float, n: float) -> dict:
    n = max(n, 1e-12)
    return {"miss": m / n, "incorrect": i / n, "hallucination": h / n,
            "incorrect_plus_hallucination": (i + h) / n, "total": (m + i + h) / n}


def aggregate(scores: Iterable[VideoScore]) -> dict:
    """Micro (over all events) and macro (per-video mean) rates, with counts and the failed videos."""
    scores = list(scores)
    ok = [s for s in scores if not s.failed]
    sums = {k: float(sum(getattr(s, k) for s in ok)) for k in ("missed", "incorrect", "hallucinated")}
    events = int(sum(s.num_events for s in ok))
    micro = _rates(sums["missed"], sums["incorrect"], sums["hallucinated"], events) if events else None
    per_video = [_rates(s.missed, s.incorrect, s.hallucinated, s.num_events) for s in ok if s.num_events]
    macro = ({k: float(np.mean([r[k] for r in per_video])) for k in per_video[0]} if per_video else None)
    return {
        "videos": len(scores),
        "scored": len(ok),
        "failed": len(scores) - len(ok),
        "failed_ids": [s.id for s in scores if s.failed],
        "failed_errors": {s.id: s.error for s in scores if s.failed},
        "events": events,
        "counts": sums,
        "micro": micro,
        "macro": macro,
        "videos_without_events": sum(1 for s in ok if not s.num_events),
        # caption sentences a parsing judge (exact) could not read: counted as hallucinated
        "unparsed_sentences": int(sum(s.details.get("unparsed_sentences", 0) for s in ok)),
        # scored from fewer passes than asked (some passes of a multi-pass judge failed)
        "partial_ids": [s.id for s in ok if s.details.get("passes_ok", 0) < s.details.get("passes", 0)],
    }
