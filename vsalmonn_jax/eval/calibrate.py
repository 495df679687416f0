"""Fit the embedding judge's thresholds to labelled judgments (e.g. the llm or exact judge's output).

Labels file (JSONL, the `per_video.jsonl` a report writes is one): {"id", "model"?, "stage"?, "sample"?,
"missed": int | list, "incorrect": int | list, "hallucinated": int | list, "event_labels"?: [correct |
missed | incorrect per event], "failed"?: bool}. Agreement per video: event labels equal (or, with
counts only, the overlap of the correct / missed / incorrect histograms) and hallucination counts
(sum min / sum max); the objective is the mean of the two micro agreements. Captions are embedded
once; the grid (match x correct x cover threshold x number rule) only re-runs the assignment.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence

import numpy as np

from vsalmonn_jax.eval.embedding import NUMBER_RULES, EmbeddingJudge, assign, label_events
from vsalmonn_jax.eval.metrics import LABELS
from vsalmonn_jax.eval.records import RecordError, iter_jsonl

DEFAULT_GRID = {
    "match_threshold": tuple(np.round(np.arange(0.30, 0.801, 0.05), 2)),
    "correct_threshold": tuple(np.round(np.arange(0.50, 0.951, 0.05), 2)),
    "cover_threshold": (0.0, 0.8, 0.85, 0.9, 0.95),
    "number_rule": NUMBER_RULES,
}


def _count(value, where: str, key: str) -> int:
    if isinstance(value, list):
        return len(value)
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return value
    raise RecordError(f"{where}: field {key!r} must be a count or a list, got {value!r}")


def load_labels(path) -> tuple[dict[tuple[str, str, str, int], dict], list[str]]:
    """{(model, stage, id, sample): {"missed", "incorrect", "hallucinated", "event_labels"}}, failed ids."""
    labels, failed = {}, []
    for lineno, obj in iter_jsonl(path):
        where = f"{path}:{lineno}"
        if "id" not in obj:
            raise RecordError(f"{where}: missing field 'id'")
        key = (str(obj.get("model", "") or ""), str(obj.get("stage", "") or ""), str(obj["id"]),
               int(obj.get("sample", 0) or 0))
        if obj.get("failed"):
            failed.append(key[2])
            continue
        label = {k: _count(obj.get(k, 0), where, k) for k in ("missed", "incorrect", "hallucinated")}
        event_labels = obj.get("event_labels")
        if event_labels is not None and (not isinstance(event_labels, list)
                                         or any(x not in LABELS for x in event_labels)):
            raise RecordError(f"{where}: 'event_labels' must be a list of {LABELS}")
        label["event_labels"] = event_labels
        if key in labels:
            raise RecordError(f"{where}: duplicate label for {key}")
        labels[key] = label
    return labels, failed


def video_agreement(pred_labels: list[str], pred_hall: int, label: Mapping) -> tuple:
    """(events agreed, events, hallucination min, hallucination max, predicted (M, I, H),
    labelled (M, I, H)) for one video."""
    n = len(pred_labels)
    truth = label.get("event_labels")
    if truth is not None and len(truth) == n:
        agreed = sum(a == b for a, b in zip(pred_labels, truth, strict=True))
    else:
        ref = {"missed": label["missed"], "incorrect": label["incorrect"]}
        ref["correct"] = max(n - ref["missed"] - ref["incorrect"], 0)
        agreed = sum(min(pred_labels.count(k), ref[k]) for k in LABELS)
    h = label["hallucinated"]
    predicted = (pred_labels.count("missed"), pred_labels.count("incorrect"), pred_hall)
    labelled = (label["missed"], label["incorrect"], h)
    return agreed, n, min(pred_hall, h), max(pred_hall, h), predicted, labelled


def summarize(rows: Sequence[tuple]) -> dict:
    agreed, n, hmin, hmax = (float(sum(r[i] for r in rows)) for i in range(4))
    event = agreed / n if n else 1.0
    hall = hmin / hmax if hmax else 1.0
    names = ("miss", "incorrect", "hallucination")
    rates = {f"{who}_{name}": float(sum(r[col][k] for r in rows)) / max(n, 1)
             for who, col in (("judge", 4), ("labels", 5)) for k, name in enumerate(names)}
    return {"event_agreement": event, "hallucination_agreement": hall, "objective": (event + hall) / 2,
            "micro_rates": rates}


def calibrate(judge: EmbeddingJudge, pairs: Sequence[tuple[str, Sequence]], labels: Sequence[Mapping],
              grid: Mapping[str, Sequence] | None = None) -> dict:
    """Grid search of the thresholds; returns the best options, its agreement and the current one's."""
    if len(pairs) != len(labels):
        raise ValueError(f"{len(pairs)} captions but {len(labels)} labels")
    if not pairs:
        raise ValueError("calibrate: no labelled captions")
    grid = {**DEFAULT_GRID, **(grid or {})}
    inputs = judge.prepare(pairs)

    def evaluate(options, assignments=None) -> dict:
        rows = []
        for k, (inp, label) in enumerate(zip(inputs, labels, strict=True)):
            pairs_k = (assignments[k] if assignments is not None
                       else assign(inp, options.match_threshold, options.number_rule))
            decision = label_events(inp, options, pairs_k)
            hallucinated = len(inp.units) - len(decision.matched_units) - len(decision.supported_units)
            rows.append(video_agreement(decision.labels, hallucinated, label))
        return summarize(rows)

    current = evaluate(judge.options)
    best, best_options, tried = None, judge.options, 0
    for match, rule in itertools.product(grid["match_threshold"], grid["number_rule"]):
        assignments = [assign(inp, float(match), rule) for inp in inputs]
        for correct, cover in itertools.product(grid["correct_threshold"], grid["cover_threshold"]):
            if correct < match:
                continue
            options = dataclasses.replace(judge.options, match_threshold=float(match), number_rule=rule,
                                          correct_threshold=float(correct), cover_threshold=float(cover))
            result = evaluate(options, assignments)
            tried += 1
            if best is None or result["objective"] > best["objective"] + 1e-12:
                best, best_options = result, options
    return {"fitted": best_options.fitted(), "agreement": best, "current": judge.options.fitted(),
            "current_agreement": current, "grid_points": tried, "videos": len(pairs),
            "events": int(sum(len(inp.events) for inp in inputs))}
