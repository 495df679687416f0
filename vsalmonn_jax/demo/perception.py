"""What a demo stage perceives: per event kind, the % of the test clips' ground-truth events its captions
state correctly (exact judge), and how many distinct captions it wrote (a model ignoring the media repeats a few).
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping, Sequence

from vsalmonn_jax.data.annotator import KINDS, event_kind
from vsalmonn_jax.demo.caption import judged
from vsalmonn_jax.eval import get_judge

__all__ = ["KINDS", "event_kind", "perception", "perception_section"]


def perception(items: Sequence[Mapping], captions: Sequence[Mapping]) -> dict:
    """items: test clips {"id", "events"}; captions: one {"id", "caption", "stopped"} per clip, judged
    as the stage was (an unstopped caption's runaway repeats collapsed). Returns {"correct": {kind: %
    of its events labelled correct, None without events}, "events": {kind: count}, "correct_events":
    total correct, "distinct_captions": distinct caption strings, "clips": len(captions)}."""
    by_id = {item["id"]: item for item in items}
    unknown = [c["id"] for c in captions if c["id"] not in by_id]
    if unknown:
        raise ValueError(f"{len(unknown)} caption(s) of clips not in the items, e.g. {unknown[0]!r}")
    pairs = [(judged(c["caption"], bool(c.get("stopped", True))), by_id[c["id"]]["events"]) for c in captions]
    scores = get_judge("exact").score_many(pairs, ids=[c["id"] for c in captions])
    events, right = dict.fromkeys(KINDS, 0), dict.fromkeys(KINDS, 0)
    for (_, gt), score in zip(pairs, scores, strict=True):
        for event, label in zip(gt, score.event_labels, strict=True):
            kind = event_kind(event)
            events[kind] = events.get(kind, 0) + 1
            right[kind] = right.get(kind, 0) + (label == "correct")
    return {"correct": {k: 100.0 * right[k] / n if n else None for k, n in events.items()},
            "events": events, "correct_events": sum(right.values()),
            "distinct_captions": len({c["caption"] for c in captions}), "clips": len(captions)}


def ground_truth_items(config, count: int, split: str = "test") -> list[dict]:
    """The first `count` clips of a split of the run's data set (ids, events), rebuilt from its config."""
    from vsalmonn_jax.data import synthetic
    from vsalmonn_jax.demo.data import clip_items

    return clip_items(int(config.demo.seed), split, count, synthetic.synthetic_config(config),
                      config.demo.get("annotator"))


def _stage_files(run_dir: pathlib.Path, name: str, record: Mapping, split: str):
    """(captions, scores record) of a stage on `split`: test = captions.jsonl + its eval.json
    record; val = val.json (both in one file). None when the stage has no captions there."""
    folder = run_dir / "stages" / name
    if split == "val":
        path = folder / "val.json"
        if not path.exists():
            return None
        val = json.loads(path.read_text(encoding="utf-8"))
        return val.get("captions"), val
    path = folder / "captions.jsonl"
    if not path.exists():
        return None
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()], record


def _judged_correct(record: dict) -> float | None:
    """Correct events by the stage's own scores (eval.json per_video), for the consistency check."""
    per_video = record.get("per_video")
    return None if per_video is None else sum(v["n"] - v["missed"] - v["incorrect"] for v in per_video)


def perception_section(run_dir: pathlib.Path, records: Mapping, config, items=None,
                       split: str = "test") -> tuple[list[str], dict]:
    """The report's "What the model perceives" lines and {stage: perception(...)} on `split` (test:
    captions.jsonl, val: val.json). A stage without captions there has no row; one whose ground
    truth (rebuilt from `config` unless `items` are given) disagrees with its scores gets a note
    instead of a row."""
    found = {n: f for n in records if (f := _stage_files(run_dir, n, records[n], split)) and f[0]}
    captions = {n: f[0] for n, f in found.items()}
    if not captions:
        return [], {}
    if items is None:
        size = int(config.demo.n_test if split == "test" else config.demo.n_val)
        items = ground_truth_items(config, max(size, *(len(c) for c in captions.values())), split)
    results, notes = {}, []
    for name, caps in captions.items():
        try:
            result = perception(items, caps)
        except ValueError as err:
            notes.append(f"- {name}: no row ({err}).")
            continue
        expected = _judged_correct(found[name][1])
        if expected is not None and abs(expected - result["correct_events"]) > 1e-6:
            notes.append(f"- {name}: no row: its captions get {result['correct_events']} events right "
                         f"against the ground truth rebuilt here, {expected:g} in its eval.json (is "
                         "this config's demo.seed / data.synthetic the run's?).")
            continue
        results[name] = result
    lines = ["## What the model perceives" + (" (validation split)" if split == "val" else ""), ""]
    if results:
        first = next(iter(results.values()))
        lines += ["| stage | " + " | ".join(f"{k} % (n={first['events'][k]})" for k in KINDS)
                  + " | distinct captions |", "|---|" + "---:|" * (len(KINDS) + 1)]
        for name, r in results.items():
            cells = ["-" if r["correct"][k] is None else f"{r['correct'][k]:.1f}" for k in KINDS]
            lines.append(f"| {name} | " + " | ".join(cells)
                         + f" | {r['distinct_captions']} of {r['clips']} |")
        lines += ["", f"% of each kind's ground-truth {split} events that the captions state exactly "
                  "(exact judge; sounds = every audio event): a kind near 0 % is not perceived, and "
                  "a handful of distinct captions means the model ignores the media and writes the "
                  "same few captions for every clip."]
    return lines + ([""] if results and notes else []) + notes, results
