"""Quarantine of failed records: one JSON line each in quarantine.jsonl with the reason, counted, and
a stop with a clear message when more than `max_failure_share` of the records seen have failed."""

from __future__ import annotations

import collections
import json
import os


class TooManyFailures(RuntimeError):
    """More than the allowed share of records failed; the message names the counts and the file."""


class Quarantine:
    """Counts seen / failed records; appends failures to `path` ("" = count only, no file)."""

    def __init__(self, path: str = "", max_failure_share: float = 0.05, min_seen: int = 20):
        self.path, self.max_failure_share, self.min_seen = path, float(max_failure_share), min_seen
        self.seen, self.failed = 0, 0
        self.reasons: collections.Counter[str] = collections.Counter()

    def ok(self) -> None:
        self.seen += 1

    def add(self, example: dict) -> None:
        """Record a failed example (a Featurizer failure dict) and check the failure share."""
        self.seen += 1
        self.failed += 1
        self.reasons[example["failed"]] += 1
        if self.path:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            entry = {key: example.get(key) for key in
                     ("id", "example_id", "source", "line", "video", "audio", "failed", "detail")}
            entry["example_id"] = int(entry["example_id"]) if entry["example_id"] is not None else None
            entry["reason"] = entry.pop("failed")
            with open(self.path, "a") as f:
                f.write(json.dumps(entry) + "\n")
        self.check(final=False)

    def share(self) -> float:
        return self.failed / self.seen if self.seen else 0.0

    def check(self, final: bool = True) -> None:
        """Raise TooManyFailures past the share (mid-run only after `min_seen` records)."""
        if (final or self.seen >= self.min_seen) and self.share() > self.max_failure_share:
            raise TooManyFailures(
                f"{self.failed} of {self.seen} records failed ({self.share():.1%} > "
                f"data.max_failure_share {self.max_failure_share:.1%}); reasons: "
                f"{dict(self.reasons)}; see {self.path or 'the quarantine log'}")

    def summary(self) -> str:
        where = f" -> {self.path}" if self.path and self.failed else ""
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.reasons.items()))
        return f"data: {self.seen} records, {self.failed} quarantined" + \
            (f" ({reasons}){where}" if self.failed else "")

    def state(self) -> dict:
        return {"seen": self.seen, "failed": self.failed, "reasons": dict(self.reasons)}

    def restore(self, state: dict) -> None:
        self.seen, self.failed = int(state["seen"]), int(state["failed"])
        self.reasons = collections.Counter(state.get("reasons", {}))
