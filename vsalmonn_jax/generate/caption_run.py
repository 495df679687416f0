"""The captioning loop: pending (item, sample) rows -> backend batches -> JSONL lines, bad media skipped.

Independent of the model: a backend turns an item into a prepared example (or raises
`UnreadableInput` naming why) and captions batches of rows. Each finished batch is flushed to the
output before the next starts, so an interrupted run resumes where it stopped (caption_io.read_done).
The errors file lists each unreadable item once: a resume retries the listed items but never adds a
second line for one, drops the line of one that now has captions, and (like the output) cuts a
partial last line left by a crash.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

from vsalmonn_jax.atomic_file import write_jsonl
from vsalmonn_jax.generate.caption_io import (
    InputError,
    JsonlWriter,
    pending,
    read_done,
    whole_lines,
)


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


def caption_rows(todo: Iterable[tuple[dict, int]], backend: CaptionBackend,
                 on_unreadable: Callable[[dict, str], None]) -> Iterator[list[tuple[dict, int, dict]]]:
    """(item, sample) rows, item-major -> lists of (item, sample, result), one list per backend
    batch. Each item is prepared once; an unreadable one goes to `on_unreadable(item, reason)` and
    its rows are skipped. A batch the device fails on (out of memory, an XLA runtime error) is
    retried an item at a time, in calls padded to that item's rows (a backend's rows_per_call): the
    item that still fails is reported as unreadable, the others are captioned (a resume would
    otherwise hit the same batch again)."""
    prepared: dict[str, Any] = {}
    bad: set[str] = set()
    rows: list[tuple[dict, int, Any]] = []

    def run(batch: list[tuple[dict, int, Any]], fewer: bool = True) -> list[tuple[dict, int, dict]]:
        try:
            results = backend.caption(batch)
        except Exception as err:   # noqa: BLE001 - only the device's errors are handled here
            if not _device_error(err):
                raise
            keys = list(dict.fromkeys(item["id"] for item, _, _ in batch))   # in order
            if len(keys) == 1 and not fewer:
                bad.add(keys[0])
                on_unreadable(batch[0][0], f"captioning failed on the device: "
                              f"{type(err).__name__}: {str(err).splitlines()[0][:300]}")
                return []
            done = []
            for key in keys:   # each item alone, in calls padded to its rows only (when it can)
                rows_of = [r for r in batch if r[0]["id"] == key]
                smaller = getattr(backend, "rows_per_call", None)
                with smaller(len(rows_of)) if smaller else contextlib.nullcontext():
                    done += run(rows_of, fewer=False)
            return done
        if len(results) != len(batch):
            raise RuntimeError(f"caption backend returned {len(results)} results for {len(batch)} rows")
        return [(item, sample, res) for (item, sample, _), res in zip(batch, results, strict=True)]

    def flush():
        batch = list(rows)
        rows.clear()
        return run(batch)

    for item, sample in todo:
        key = item["id"]
        if key in bad:
            continue
        if key not in prepared:
            prepared.clear()           # items arrive item-major: keep only the current one
            try:
                prepared[key] = backend.prepare(item)
            except UnreadableInput as err:
                bad.add(key)
                on_unreadable(item, str(err))
                continue
        rows.append((item, sample, prepared[key]))
        if len(rows) == backend.batch_size:
            yield flush()
    if rows:
        yield flush()


def _device_error(err: Exception) -> bool:
    """An accelerator's failure on a batch (out of memory, an XLA runtime error), not a bug."""
    import jax

    return isinstance(err, jax.errors.JaxRuntimeError | MemoryError)


def read_errors(path: str) -> list[dict]:
    """The records of an errors file (none when it is missing); truncates a partial last line."""
    records = []
    for number, line in enumerate(whole_lines(path), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            records.append({**record, "id": str(record["id"])})
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise InputError(f"{path}:{number}: not an errors line ({err}); refusing to write into a "
                             "file this command did not write") from err
    return records


def settle_errors(listed: list[dict], failed: list[dict], captioned: set[str]) -> list[dict]:
    """The errors file after a run: one line per id, the latest reason, none for a captioned id."""
    latest = {record["id"]: record for record in listed + failed}
    return [record for key, record in latest.items() if key not in captioned]


def run_captions(items: list[dict], backend: CaptionBackend, *, output: str, errors_output: str,
                 num_samples: int = 1, progress: bool = True,
                 warn: Callable[[str], None] | None = None) -> CaptionSummary:
    """Caption every (item, sample) not yet in `output`; unreadable items go to `errors_output`
    (one JSON line each, with the reason; see the module docstring) and to `warn`, and the rest
    still finish."""
    warn = warn or (lambda text: print(text, file=sys.stderr, flush=True))
    done = read_done(output)
    listed = read_errors(errors_output)
    in_file = list(listed)                       # the errors file's lines, as this run leaves them
    known = {record["id"] for record in listed}
    todo = list(pending(items, num_samples, done))
    summary = CaptionSummary(total=len(items) * num_samples)
    summary.already_done = summary.total - len(todo)
    captioned = {key for key, _ in done}
    bar = _bar(summary.total, summary.already_done, progress)
    with JsonlWriter(output) as out, JsonlWriter(errors_output) as errors:

        def unreadable(item: dict, reason: str) -> None:
            where = item.get("video") or item.get("audio")
            record = {"id": item["id"], "video": item.get("video"), "audio": item.get("audio"),
                      "error": reason}
            summary.failed.append(record)
            if record["id"] not in known:   # listed by an earlier run: not a second line
                known.add(record["id"])
                errors.write_many([record])
                in_file.append(record)
            warn(f"caption: skipped {where}: {reason}")
            bar.update(sum(1 for it, _ in todo if it["id"] == item["id"]))   # its skipped rows

        for batch in caption_rows(todo, backend, unreadable):
            out.write_many(output_row(item, sample, res) for item, sample, res in batch)
            captioned.update(item["id"] for item, _, _ in batch)
            summary.written += len(batch)
            bar.update(len(batch))
    bar.close()
    settled = settle_errors(listed, summary.failed, captioned)
    if settled != in_file:
        write_jsonl(errors_output, settled, ensure_ascii=False)
    return summary


def _bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="caption", file=sys.stderr,
                dynamic_ncols=True)
