"""Caption metrics (missed / incorrect / hallucinated events, repetition), judges, QA accuracy, reports.

For callers such as mrDPO's pair ranking:
    from vsalmonn_jax.eval import get_judge, aggregate
    judge = get_judge("exact" | "embedding" | "llm", config)   # config: run config or its eval section
    score = judge.score(caption, events)                        # VideoScore: .missed .incorrect
    scores = judge.score_many([(caption, events), ...])         #   .hallucinated .total .failed
    aggregate(scores)["micro"]["total"]
A sampled caption that hit the length limit without an end token is judged as
collapse_repeats(caption), as `vsalmonn-jax eval` does for records with "stopped": false.
"""

from vsalmonn_jax.eval.judge import Judge, get_judge
from vsalmonn_jax.eval.metrics import (
           VideoScore,
           aggregate,
           collapse_repeats,
           repetition_stats,
           seq_rep,
)

__all__ = ["Judge", "VideoScore", "aggregate", "collapse_repeats", "get_judge", "repetition_stats",
           "seq_rep"]
