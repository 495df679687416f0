"""Benchmark: the embedding judge on 500 synthetic videos x 30 events (time, and agreement with exact).

Captions come from the ground-truth events with injected errors (eval/inject.py: dropped, swapped,
invented, repeated and free sentences). The exact judge is the reference (and the speed baseline,
measured in the same run). Agreement is over binary labels: per ground-truth event "missed or not"
and per caption sentence "hallucinated or not". The embedding judge runs with its default thresholds
(no fitting on these videos); a calibration on a disjoint 100-video split is reported alongside.

    .venv/bin/python bench/eval.py [--videos 500] [--events 30]
Ends with `BENCH embedding_judge_seconds <s>` and `BENCH embedding_vs_exact_agreement <fraction>`.
"""

from __future__ import annotations

import argparse
import collections
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

from vsalmonn_jax.data import synthetic_scene  # noqa: E402
from vsalmonn_jax.eval.calibrate import calibrate  # noqa: E402
from vsalmonn_jax.eval.embedding import load_sentence_model  # noqa: E402
from vsalmonn_jax.eval.inject import inject_errors, long_scene_events  # noqa: E402
from vsalmonn_jax.eval.judge import get_judge  # noqa: E402
from vsalmonn_jax.eval.metrics import aggregate  # noqa: E402


def make_videos(seed: int, start: int, count: int, events: int):
    rng = np.random.default_rng([seed, start])
    gt = [long_scene_events(seed, start + i, events) for i in range(count)]
    return [(inject_errors(e, rng), e) for e in gt]


def binary_agreement(reference, candidate) -> dict:
    """Agreement on missed (per event) and hallucinated (per caption sentence) labels."""
    ev_agree = ev_total = sent_agree = sent_total = 0
    conf = collections.Counter()
    for ref, cand in zip(reference, candidate, strict=True):
        for a, b in zip(ref.event_labels, cand.event_labels, strict=True):
            ev_agree += (a == "missed") == (b == "missed")
            conf[(a, b)] += 1
        ev_total += ref.num_events
        sentences = cand.details["units"]
        a, b = collections.Counter(ref.hallucinated_sentences), collections.Counter(cand.hallucinated_sentences)
        sent_agree += sentences - sum(((a - b) + (b - a)).values())
        sent_total += sentences
    return {"missed": ev_agree / ev_total, "hallucinated": sent_agree / sent_total,
            "overall": (ev_agree + sent_agree) / (ev_total + sent_total),
            "label_agreement_3way": sum(v for (a, b), v in conf.items() if a == b) / ev_total,
            "confusion": conf}


def rates(scores) -> str:
    micro = aggregate(scores)["micro"]
    return " ".join(f"{k}={100 * micro[k]:.1f}%" for k in ("miss", "incorrect", "hallucination", "total"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=500)
    parser.add_argument("--events", type=int, default=30)
    parser.add_argument("--calibration-videos", type=int, default=100)
    parser.add_argument("--seed", type=int, default=2024)
    args = parser.parse_args()

    pairs = make_videos(args.seed, 0, args.videos, args.events)
    vocabulary = synthetic_scene.vocabulary()
    print(f"{args.videos} videos x {args.events} events, {sum(len(c.split('. ')) for c, _ in pairs)} "
          f"caption sentences; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")

    start = time.perf_counter()
    exact = get_judge("exact", vocabulary=vocabulary).score_many(pairs)
    exact_s = time.perf_counter() - start
    print(f"exact judge (reference, baseline): {exact_s:.2f} s  {rates(exact)}")

    start, cpu_start = time.perf_counter(), time.process_time()
    load_sentence_model("")
    load_s = time.perf_counter() - start
    judge = get_judge("embedding")
    start = time.perf_counter()
    embedded = judge.score_many(pairs)
    score_s = time.perf_counter() - start
    total_s, cpu_s = load_s + score_s, time.process_time() - cpu_start
    print(f"embedding judge: model load {load_s:.1f} s + scoring {score_s:.1f} s = {total_s:.1f} s wall, "
          f"{cpu_s:.1f} s CPU ({len(judge.encoder.cache)} distinct texts embedded; load average now "
          f"{os.getloadavg()[0]:.1f})  {rates(embedded)}")
    agreement = binary_agreement(exact, embedded)
    print(f"agreement with exact (default thresholds): missed {agreement['missed']:.4f}, "
          f"hallucinated {agreement['hallucinated']:.4f}, overall {agreement['overall']:.4f}; "
          f"3-way event labels {agreement['label_agreement_3way']:.4f}")
    print("event label confusion (exact, embedding): "
          + ", ".join(f"{a}/{b} {v}" for (a, b), v in sorted(agreement["confusion"].items())))

    # calibration on a disjoint split, labelled by exact, then applied to the benchmark videos
    held = make_videos(args.seed, 10**6, args.calibration_videos, args.events)
    held_labels = get_judge("exact", vocabulary=vocabulary).score_many(held)
    start = time.perf_counter()
    fit = calibrate(judge, held, [{"missed": s.missed, "incorrect": s.incorrect,
                                   "hallucinated": s.hallucinated, "event_labels": s.event_labels}
                                  for s in held_labels])
    cal_s = time.perf_counter() - start
    fitted = judge.with_options(**fit["fitted"]).score_many(pairs)
    cal = binary_agreement(exact, fitted)
    print(f"calibrated on {args.calibration_videos} other videos in {cal_s:.1f} s: {fit['fitted']}")
    print(f"agreement with exact (calibrated): missed {cal['missed']:.4f}, hallucinated "
          f"{cal['hallucinated']:.4f}, overall {cal['overall']:.4f}; 3-way event labels "
          f"{cal['label_agreement_3way']:.4f}  {rates(fitted)}")
    print(f"BENCH embedding_judge_seconds {total_s:.1f}")
    print(f"BENCH embedding_vs_exact_agreement {agreement['overall']:.4f}")


if __name__ == "__main__":
    main()
