"""Scoring a captions file against a ground-truth file: per (model, stage, sample) group, judge + repetition.

Captions without an end token get the runaway-repeat collapse before judging (repetition metrics
use the raw text). A caption whose id has no ground truth is an error; ground-truth videos a group
did not caption are listed in the result, never silently ignored.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from vsalmonn_jax.eval.judge import Judge
from vsalmonn_jax.eval.metrics import aggregate, collapse_repeats, repetition_stats
from vsalmonn_jax.eval.records import CaptionRecord, RecordError


def judged_text(record: CaptionRecord) -> str:
    return record.caption if record.stopped else collapse_repeats(record.caption)


def group_label(model: str, stage: str, sample: int = 0) -> str:
    label = "/".join(p for p in (model, stage) if p) or "captions"
    return f"{label} sample {sample}" if sample else label


def check_ids(records: Sequence[CaptionRecord], gt: Mapping[str, list], source: str = "captions") -> None:
    unknown = sorted({r.id for r in records} - set(gt))
    if unknown:
        shown = ", ".join(repr(i) for i in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise RecordError(f"{source}: {len(unknown)} caption id(s) have no ground truth: {shown}")


def groups_of(records: Sequence[CaptionRecord]) -> dict[tuple[str, str, int], list[CaptionRecord]]:
    groups: dict[tuple[str, str, int], list[CaptionRecord]] = {}
    for record in records:
        groups.setdefault(record.group, []).append(record)
    return groups


def evaluate(records: Sequence[CaptionRecord], gt: Mapping[str, list], judge: Judge) -> dict:
    """{"judge": settings, "groups": [{model, stage, sample, label, aggregate, repetition, scores}]}."""
    check_ids(records, gt)
    results = []
    for (model, stage, sample), group in groups_of(records).items():
        texts = [judged_text(r) for r in group]
        scores = judge.score_many([(t, gt[r.id]) for t, r in zip(texts, group, strict=True)],
                                  ids=[r.id for r in group])
        results.append({
            "model": model, "stage": stage, "sample": sample, "label": group_label(model, stage, sample),
            "aggregate": aggregate(scores),
            "repetition": repetition_stats([r.caption for r in group], [r.stopped for r in group]),
            "collapsed_captions": sum(t != r.caption for t, r in zip(texts, group, strict=True)),
            "uncaptioned_ids": sorted(set(gt) - {r.id for r in group}),
            "scores": scores,
        })
    return {"judge": judge.describe(), "groups": results}
