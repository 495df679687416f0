"""Quarantine of failed records: one JSON line per (record id, reason) in quarantine.jsonl (not one
per epoch or restart), counted, and a stop when more than `max_failure_share` of the records seen failed."""

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
        self._logged: set[tuple[str, str]] | None = None   # (id, reason) already in the file

    def _already_logged(self, key: tuple[str, str]) -> bool:
        """Whether (id, reason) is in the file (read once: a resumed run keeps the earlier lines)."""
        if self._logged is None:
            self._logged = set()
            if os.path.exists(self.path):
                with open(self.path, encoding="utf-8", errors="replace") as f:
                    for line in f:
                        try:
                            entry = json.loads(line)
                            self._logged.add((str(entry["id"]), str(entry["reason"])))
                        except (ValueError, KeyError, TypeError):
                            continue      # a line cut by a crash: it will be written again
        if key in self._logged:
            return True
        self._logged.add(key)
        return False

    def ok(self) -> None:
        self.seen += 1

    def add(self, example: dict) -> None:
        """Record a failed example (a Featurizer failure dict) and check the failure share."""
        self.seen += 1
        self.failed += 1
        self.reasons[example["failed"]] += 1
        if self.path and not self._already_logged((str(example.get("id")), str(example["failed"]))):
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
