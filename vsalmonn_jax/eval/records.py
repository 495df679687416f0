"""Caption and ground-truth record files (JSONL) for evaluation: reading, validation, event texts.

Formats (one JSON object per line; blank lines are skipped, anything else that is not an object is
an error naming the file and line):

captions file   {"id": str, "caption": str, "stopped": bool (see below), "model": str = "",
                 "stage": str = "", "sample": int = 0}
    `stopped` says the caption ended with an end-of-turn token; a caption without one gets the
    runaway-repeat collapse before it is judged. Captions from elsewhere (e.g. the official
    release's inference output, decoded keeping special tokens) may carry the tokens' text: a
    caption is cut at its first end token (END_TOKENS: "<|im_end|>", "<|endoftext|>") and any other
    special-token string ("<|im_start|>", ...) is removed before judging. Without a `stopped` field
    a caption is stopped when it had an end token, provided some caption of the file without the
    field has one (the file was decoded keeping them: one that ran to the length limit has none);
    in a file where none has one (plain text, no way to tell) it defaults to true.
    (model, stage, id, sample) must be unique: one file may hold the captions of several models /
    stages / sample indices (the `caption` command's output lines), which the report compares side
    by side as groups.
ground-truth    {"id": str, "events": [event, ...]}
    An event is either a string (free text: embedding / llm judges) or a dict. Dicts with "time",
    "modality", "subject", "action" are synthetic events (exact judge; their text is the grammar's
    sentence); any dict may carry "text", the sentence the embedding / llm judges read. A "time" is
    a finite number >= 0; `"time": null` is an untimed event, which needs a "text" (see
    data/records.check_event). The exact judge refuses events and captions outside its grammar.
QA questions    {"id": str, "question": str, "options": [str, ...], "answer": "B",
                 "category": str = ""}  (see eval/qa.py)
QA predictions  {"id": str, "response": str, "model": str = "", "stage": str = ""}
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from collections.abc import Iterator, Mapping

from vsalmonn_jax.data.event_grammar import render_event
from vsalmonn_jax.data.records import check_event, jsonl_lines

_SYNTHETIC_KEYS = ("time", "modality", "subject", "action")
END_TOKENS = ("<|im_end|>", "<|endoftext|>")        # Qwen2's end of turn / end of text
_SPECIAL_TOKEN = re.compile(r"<\|[A-Za-z0-9_]+\|>")   # <|im_start|>, <|vision_start|>, ...


class RecordError(ValueError):
    """A malformed record; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class CaptionRecord:
    id: str
    caption: str
    stopped: bool = True
    model: str = ""
    stage: str = ""
    sample: int = 0

    @property
    def group(self) -> tuple[str, str, int]:
        return (self.model, self.stage, self.sample)

    @property
    def key(self) -> tuple[str, str, str, int]:
        return (self.model, self.stage, self.id, self.sample)


def iter_jsonl(path: str | pathlib.Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line; a bad line raises RecordError."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    for lineno, line in jsonl_lines(str(path), RecordError):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise RecordError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
        if not isinstance(obj, dict):
            raise RecordError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        yield lineno, obj


def _require(obj: Mapping, key: str, kind: type | tuple, where: str):
    if key not in obj:
        raise RecordError(f"{where}: missing field {key!r}")
    value = obj[key]
    if not isinstance(value, kind) or (kind is str and isinstance(value, bool)):
        name = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise RecordError(f"{where}: field {key!r} must be {name}, got {type(value).__name__}")
    return value


def strip_special_tokens(text: str) -> tuple[str, bool]:
    """(caption, ended): the text before its first end token with the other special-token strings
    removed, and whether it had an end token. Text without any is returned unchanged."""
    if not _SPECIAL_TOKEN.search(text):
        return text, False
    cuts = [i for i in (text.find(token) for token in END_TOKENS) if i >= 0]
    if cuts:
        text = text[:min(cuts)]
    return _SPECIAL_TOKEN.sub("", text).strip(), bool(cuts)


def load_captions(path: str | pathlib.Path) -> list[CaptionRecord]:
    """Read a captions file; duplicate (model, stage, id) keys are an error. Special-token strings
    are stripped and a missing `stopped` is inferred from them (see the module docstring)."""
    rows, seen = [], {}
    for lineno, obj in iter_jsonl(path):
        where = f"{path}:{lineno}"
        video_id = str(_require(obj, "id", (str, int), where))
        caption, ended = strip_special_tokens(_require(obj, "caption", str, where))
        stopped = obj.get("stopped") if "stopped" in obj else None
        if "stopped" in obj and not isinstance(stopped, bool):
            raise RecordError(f"{where}: field 'stopped' must be a boolean, got {stopped!r}")
        sample = obj.get("sample", 0)
        if isinstance(sample, bool) or not isinstance(sample, int) or sample < 0:
            raise RecordError(f"{where}: field 'sample' must be a non-negative integer, got {sample!r}")
        record = CaptionRecord(video_id, caption, True, str(obj.get("model", "") or ""),
                               str(obj.get("stage", "") or ""), sample)
        if record.key in seen:
            raise RecordError(f"{where}: duplicate caption for id {video_id!r} (model {record.model!r}, "
                              f"stage {record.stage!r}, sample {sample}; first at line {seen[record.key]})")
        seen[record.key] = lineno
        rows.append((record, stopped, ended))
    marked = any(ended for _, stopped, ended in rows if stopped is None)   # decoded keeping them
    return [dataclasses.replace(record, stopped=stopped if stopped is not None else (ended or not marked))
            for record, stopped, ended in rows]


def validate_event(event, where: str) -> None:
    """The forms of data/records.check_event (free text, text + time, structured); RecordError."""
    try:
        check_event(event, "event")
    except ValueError as err:
        raise RecordError(f"{where}: {err}") from None


def load_gt(path: str | pathlib.Path) -> dict[str, list]:
    """Read a ground-truth file -> {id: events}; duplicate ids and malformed events are errors."""
    gt, first = {}, {}
    for lineno, obj in iter_jsonl(path):
        where = f"{path}:{lineno}"
        video_id = str(_require(obj, "id", (str, int), where))
        events = _require(obj, "events", list, where)
        for index, event in enumerate(events):
            validate_event(event, f"{where}: events[{index}]")
        if video_id in gt:
            raise RecordError(f"{where}: duplicate ground truth for id {video_id!r} (first at line {first[video_id]})")
        gt[video_id], first[video_id] = events, lineno
    return gt


def event_text(event) -> str:
    """The sentence a text judge reads for an event: the string itself, its "text", or the grammar's."""
    if isinstance(event, str):
        return event.strip()
    if isinstance(event.get("text"), str) and event["text"].strip():
        return event["text"].strip()
    return render_event(event)


def is_synthetic_event(event) -> bool:
    """A structured event the exact judge can read (an untimed `"time": null` one is not)."""
    return isinstance(event, Mapping) and all(event.get(k) is not None for k in _SYNTHETIC_KEYS)


