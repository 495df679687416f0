"""The captioning loop: pending (item, sample) rows -> backend batches -> JSONL lines, bad media skipped.

Independent of the model: a backend turns an item into a prepared example (or raises
`UnreadableInput` naming why) and captions batches of rows. Each finished batch is flushed to the
output before the next starts, so an interrupted run resumes where it stopped (caption_io.read_done).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from typing import Any, Protocol

from vsalmonn_jax.generate.caption_io import JsonlWriter, pending, read_done


class UnreadableInput(Exception):
    """An item whose media or prompt cannot be prepared; the message is the reason."""


class CaptionBackend(Protocol):
    batch_size: int

    def prepare(self, item: dict) -> Any:
        """Decode + featurise one item; raises UnreadableInput."""

    def caption(self, rows: list[tuple[dict, int, Any]]) -> list[dict]:
        """(item, sample, prepared) rows -> one result dict per row, in order: caption (str),
        stopped (bool), num_tokens (int), logprob (float)."""


@dataclasses.dataclass
class CaptionSummary:
    total: int = 0            # (item, sample) rows asked for
    already_done: int = 0     # found in the output at start (resume)
    written: int = 0          # lines written by this run
    failed: list[dict] = dataclasses.field(default_factory=list)   # {"id", "video", "audio", "error"}


def output_row(item: dict, sample: int, result: dict) -> dict:
    row = {"id": item["id"]}
    for key in ("video", "audio", "prompt"):
        if item.get(key) is not None:
            row[key] = item[key]
    row["sample"] = sample
    row.update(result)
    return row


def run_captions(items: list[dict], backend: CaptionBackend, *, output: str, errors_output: str,
                 num_samples: int = 1, progress: bool = True,
                 warn: Callable[[str], None] | None = None) -> CaptionSummary:
    """Caption every (item, sample) not yet in `output`; unreadable items go to `errors_output`
    (one JSON line each, with the reason) and to `warn`, and the rest still finish."""
    warn = warn or (lambda text: print(text, file=sys.stderr, flush=True))
    done = read_done(output)
    todo = list(pending(items, num_samples, done))
    summary = CaptionSummary(total=len(items) * num_samples)
    summary.already_done = summary.total - len(todo)
    bar = _bar(summary.total, summary.already_done, progress)
    prepared: dict[str, Any] = {}
    bad: set[str] = set()
    rows: list[tuple[dict, int, Any]] = []
    with JsonlWriter(output) as out, JsonlWriter(errors_output) as errors:

        def flush():
            results = backend.caption(rows)
            if len(results) != len(rows):
                raise RuntimeError(f"caption backend returned {len(results)} results for {len(rows)} rows")
            out.write_many(output_row(item, sample, res)
                           for (item, sample, _), res in zip(rows, results, strict=True))
            summary.written += len(rows)
            bar.update(len(rows))
            rows.clear()

        for item, sample in todo:
            key = item["id"]
            if key in bad:
                bar.update(1)
                continue
            if key not in prepared:
                prepared.clear()           # items arrive item-major: keep only the current one
                try:
                    prepared[key] = backend.prepare(item)
                except UnreadableInput as err:
                    bad.add(key)
                    where = item.get("video") or item.get("audio")
                    record = {"id": key, "video": item.get("video"), "audio": item.get("audio"),
                              "error": str(err)}
                    summary.failed.append(record)
                    errors.write_many([record])
                    warn(f"caption: skipped {where}: {err}")
                    bar.update(1)
                    continue
            rows.append((item, sample, prepared[key]))
            if len(rows) == backend.batch_size:
                flush()
        if rows:
            flush()
    bar.close()
    return summary


def _bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="caption", file=sys.stderr,
                dynamic_ncols=True)
