"""The judge interface shared by the exact, embedding and llm judges, and `get_judge(name, config)`.

    judge = get_judge("exact" | "embedding" | "llm", config)    # config: full config, its eval
    score = judge.score(caption, events)                           # section, a dict or None
    scores = judge.score_many([(caption, events), ...], ids=[...])  # -> list[VideoScore]
    aggregate(scores)                                              # eval/metrics.py
Judge options come from the `eval` config section: `<judge>_<field>` (e.g. `embedding_match_threshold`,
`llm_model`), with `passes`, `cache_dir` shared.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping, Sequence

from vsalmonn_jax.eval.metrics import VideoScore

JUDGES = {
    "exact": "vsalmonn_jax.eval.exact:ExactJudge",
    "embedding": "vsalmonn_jax.eval.embedding:EmbeddingJudge",
    "llm": "vsalmonn_jax.eval.llm_judge:LlmJudge",
}
SHARED_FIELDS = ("passes", "cache_dir", "seed")


class JudgeUnavailable(RuntimeError):
    """The judge cannot be reached at all (connection refused, unknown host): no video can be
    scored, so the run stops at once with the reason instead of failing every video slowly."""


class Judge:
    """Scores captions against ground-truth event lists."""

    name = "judge"

    def score(self, caption: str, events: Sequence, video_id: str = "") -> VideoScore:
        return self.score_many([(caption, events)], ids=[video_id])[0]

    def score_many(self, pairs: Sequence[tuple[str, Sequence]],
                   ids: Sequence[str] | None = None) -> list[VideoScore]:
        raise NotImplementedError

    def describe(self) -> dict:
        """Settings written into reports (never secrets)."""
        return {"judge": self.name}


def check_pairs(pairs, ids) -> list[str]:
    ids = [str(i) for i in ids] if ids is not None else [str(i) for i in range(len(pairs))]
    if len(ids) != len(pairs):
        raise ValueError(f"score_many: {len(pairs)} pairs but {len(ids)} ids")
    for video_id, pair in zip(ids, pairs, strict=True):
        if len(pair) != 2 or not isinstance(pair[0], str):
            raise ValueError(f"score_many: video {video_id!r}: expected (caption: str, events: list), "
                             f"got {type(pair).__name__} of {[type(p).__name__ for p in pair]}")
    return ids


def eval_section(config) -> Mapping:
    """Accept a full config (with `.eval`), an eval section, a dict or None."""
    if config is None:
        return {}
    if "eval" in config and hasattr(config["eval"], "keys"):  # dict or ml_collections.ConfigDict
        return config["eval"]
    return config


def options_from_config(cls, config, prefix: str, **overrides):
    """Build an options dataclass from `<prefix>_<field>` (or shared) keys of the eval section."""
    section = eval_section(config)
    values = {}
    for field in dataclasses.fields(cls):
        for key in (f"{prefix}_{field.name}", field.name if field.name in SHARED_FIELDS else None):
            if key is not None and key in section:
                values[field.name] = section[key]
                break
    unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise TypeError(f"{cls.__name__}: unknown options {sorted(unknown)}")
    values.update(overrides)
    for field in dataclasses.fields(cls):  # tuples from ml_collections stay tuples; lists too
        if field.name in values and isinstance(values[field.name], list):
            values[field.name] = tuple(values[field.name])
    return cls(**values)


def get_judge(name: str, config=None, **options) -> Judge:
    """A judge by name; `options` override the config's fields (e.g. vocabulary= for exact)."""
    if name not in JUDGES:
        raise ValueError(f"unknown judge {name!r}; choose one of {', '.join(JUDGES)}")
    module_name, cls_name = JUDGES[name].split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls.from_config(config, **options)
