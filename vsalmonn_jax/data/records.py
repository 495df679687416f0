"""JSONL record schemas (SFT, preference pairs, caption evaluation, multiple-choice QA), validated
with errors naming file:line, and media paths resolved strictly inside a data root.

Every record may carry "video" and/or "audio" (paths relative to the data root); the loader adds
"index" (0-based line number, the batch's example_id), "line" (1-based) and "source".
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping

KINDS = ("sft", "preference", "caption", "mcq")
_LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                "system": "system"}
MODALITIES = ("visual", "audio")


def _is_segment(value) -> bool:
    """The release's `timestamps`: [start, end] seconds (other shapes, e.g. ActivityNet-style
    per-sentence [[s, e], ...], are kept as extra fields, as before)."""
    return (isinstance(value, list) and len(value) == 2
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value))


# fields of the release's data format that change what a record means but are not implemented:
# field -> (which values mean that, the reason); refused, never trained on as if absent
UNSUPPORTED = {
    "image": (lambda value: value is not None,
              "image records are not supported (the release's image path, LLaVA-OneVision's "
              "anyres tiling, is not implemented); give the image as a one-frame 'video' or drop it"),
    "timestamps": (_is_segment,
                   "segment records ([start, end] of the video) are not supported: the whole "
                   "video and its audio would be trained on; cut the segment into its own file"),
}


class RecordError(ValueError):
    """A record that violates its schema; the message starts with file:line."""


def infer_kind(record: Mapping) -> str:
    if "conversations" in record:
        return "sft"
    if any(k in record for k in ("chosen", "rejected", "gt")):
        return "preference"
    if "events" in record:
        return "caption"
    if "question" in record:
        return "mcq"
    raise ValueError("cannot tell the record kind (expected conversations | chosen/rejected/gt | "
                     "events | question)")


def resolve_media(path: str, root: str) -> str:
    """A media path (relative to `root`, or absolute inside it) -> real path; escaping is refused."""
    if not isinstance(path, str) or not path:
        raise ValueError(f"media path must be a non-empty string, got {path!r}")
    real_root = os.path.realpath(root)
    full = os.path.realpath(path if os.path.isabs(path) else os.path.join(real_root, path))
    if os.path.commonpath([full, real_root]) != real_root:
        raise ValueError(f"media path {path!r} escapes the data root {real_root}")
    return full


def _text(record: Mapping, key: str, optional: bool = False) -> str | None:
    value = record.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"field {key!r} must be a non-empty string, got {value!r}")
    return value


def conversation_turns(turns, need_assistant: bool = True) -> list[dict]:
    """[{"role"|"from", "content"|"value"}] -> [{"role", "content"}] (LLaVA roles mapped)."""
    if not isinstance(turns, list) or not turns:
        raise ValueError("field 'conversations' must be a non-empty list of turns")
    out = []
    for k, turn in enumerate(turns):
        if not isinstance(turn, Mapping):
            raise ValueError(f"conversations[{k}] must be an object, got {turn!r}")
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if role not in _LLAVA_ROLES or not isinstance(content, str):
            raise ValueError(f"conversations[{k}] needs role (user|assistant|system, or LLaVA "
                             f"human|gpt) and string content, got {dict(turn)!r}")
        out.append({"role": _LLAVA_ROLES[role], "content": content})
    if need_assistant and not any(t["role"] == "assistant" for t in out):
        raise ValueError("conversations has no assistant turn (nothing to train on)")
    return out


def check_event(event, name: str = "event") -> None:
    """One ground-truth event, in any of its three forms, or ValueError naming `name` and the fix:

    - a plain string: free text, the official test set's form ("A man opens the door.");
    - {"text": str, "time": seconds (optional)}: free text with an optional time;
    - {"time", "modality", "subject", "action"}: a structured (synthetic-grammar) event.
    A "time" is a finite number >= 0; `"time": null` marks an untimed event and needs a "text".
    The exact judge reads structured events only; the embedding / llm judges read all three.
    """
    if isinstance(event, str):
        if not event.strip():
            raise ValueError(f"{name} is an empty string")
        return
    if not isinstance(event, Mapping):
        raise ValueError(f"{name} must be a string or an object, got {event!r}")
    time = event.get("time")
    if time is not None and (isinstance(time, bool) or not isinstance(time, int | float)
                             or not math.isfinite(time) or time < 0):
        raise ValueError(f"{name}.time must be a finite number >= 0 (or null for an untimed "
                         f"event with a 'text'), got {time!r}")
    if isinstance(event.get("text"), str) and event["text"].strip():
        return
    if "text" in event:
        raise ValueError(f"{name}.text must be a non-empty string, got {event['text']!r}")
    if time is None:
        raise ValueError(f"{name} has no 'time' (or it is null) and no 'text': give the time in "
                         "seconds, or the event's sentence as 'text' / a plain string")
    if event.get("modality") not in MODALITIES:
        raise ValueError(f"{name}.modality must be one of {MODALITIES}, got {event.get('modality')!r} "
                         "(or give the event as free text)")
    for key in ("subject", "action"):
        if not isinstance(event.get(key), str) or not event[key]:
            raise ValueError(f"{name}.{key} must be a non-empty string (or give the event as free text)")


def _events(events) -> list:
    if not isinstance(events, list):
        raise ValueError("field 'events' must be a list of events (strings or objects)")
    for k, event in enumerate(events):
        check_event(event, f"events[{k}]")
    return [e if isinstance(e, str) else dict(e) for e in events]


def _record_id(value) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError(f"field 'id' must be a string or an integer, got {value!r}")
    if isinstance(value, str) and not value.strip():
        raise ValueError("field 'id' is an empty string")
    return str(value)


RELEASE_PAIR_ROLES = ("reject_gpt", "gt", "history_gpt")


def release_preference(record: Mapping) -> Mapping:
    """A DPO record in the release's form (llava/dataset/preprocess_utils.py: conversations whose
    turns are from human / gpt (chosen) / reject_gpt (rejected) / gt (the GT caption), or
    `"ce_only": true` for a cross-entropy-only record) -> our preference record {prompt, chosen,
    rejected, gt}; any other record is returned as it is. Multi-turn history (history_gpt, several
    human turns) is refused: our pairs have one prompt."""
    turns = record.get("conversations")
    if not isinstance(turns, list) or not (record.get("ce_only") is True or any(
            isinstance(t, Mapping) and t.get("from") in RELEASE_PAIR_ROLES for t in turns)):
        return record
    by_role: dict[str, list[str]] = {}
    for k, turn in enumerate(turns):
        if not isinstance(turn, Mapping) or not isinstance(turn.get("value"), str):
            raise ValueError(f"conversations[{k}] must be {{'from', 'value': str}}, got {turn!r}")
        by_role.setdefault(str(turn.get("from")), []).append(turn["value"])
    if "history_gpt" in by_role or len(by_role.get("human", [])) != 1:
        raise ValueError("a release DPO record with history (history_gpt turns, or not exactly one "
                         "human turn) is not supported: preference records have one prompt")
    unknown = sorted(set(by_role) - {"human", "gpt", "system", *RELEASE_PAIR_ROLES})
    if unknown or len(by_role.get("gpt", [])) != 1:
        raise ValueError(f"a release DPO record needs one human and one gpt turn (roles "
                         f"human | gpt | reject_gpt | gt), got roles {sorted(by_role)}")
    out = {k: v for k, v in record.items() if k not in ("conversations", "ce_only")}
    out["prompt"] = by_role["human"][0]
    if record.get("ce_only") is True:   # the release's CE-only step: CE on the gpt answer
        out["gt"] = by_role["gpt"][0]
        return out
    if "reject_gpt" not in by_role:
        raise ValueError("a release DPO record with a 'gt' turn but no 'reject_gpt' turn: the "
                         "release would ignore its gt; give reject_gpt, or \"ce_only\": true")
    out["chosen"], out["rejected"] = by_role["gpt"][0], by_role["reject_gpt"][0]
    if "gt" in by_role:
        out["gt"] = by_role["gt"][0]
    return out


def validate(record, kind: str | None, root: str, require_media: bool | None = None) -> dict:
    """One decoded JSON value -> normalised record dict (raises ValueError with the reason)."""
    if not isinstance(record, Mapping):
        raise ValueError(f"a record must be a JSON object, got {type(record).__name__}")
    if kind in (None, "preference"):
        record = release_preference(record)
    kind = kind or infer_kind(record)
    if kind not in KINDS:
        raise ValueError(f"unknown record kind {kind!r} (kinds: {KINDS})")
    out = {"kind": kind}
    for key, (means_it, why) in UNSUPPORTED.items():
        if means_it(record.get(key)):
            raise ValueError(f"field {key!r}: {why}")
    if "id" in record:
        out["id"] = _record_id(record["id"])
    for key in ("video", "audio"):
        if record.get(key) is not None:
            out[key] = resolve_media(record[key], root)
    needs_media = kind != "sft" if require_media is None else require_media
    if needs_media and "video" not in out and "audio" not in out:
        raise ValueError(f"a {kind} record needs a 'video' or 'audio' path")
    if kind == "sft":
        out["conversations"] = conversation_turns(record.get("conversations"))
    elif kind == "preference":
        out["prompt"] = _text(record, "prompt")
        for key in ("chosen", "rejected", "gt"):
            out[key] = _text(record, key, optional=True)
        if (out["chosen"] is None) != (out["rejected"] is None):
            raise ValueError("'chosen' and 'rejected' come together (or both absent for CE-only)")
        if out["chosen"] is None and out["gt"] is None:
            raise ValueError("a preference record needs chosen + rejected, or gt (CE-only)")
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if record.get(key) is not None:
                value = record[key]
                if isinstance(value, bool) or not isinstance(value, int | float) \
                        or not math.isfinite(value):
                    raise ValueError(f"field {key!r} must be a finite number (a summed log-prob), "
                                     f"got {value!r}")
                out[key] = float(value)
    elif kind == "caption":
        out["events"] = _events(record.get("events"))
        for key in ("prompt", "caption"):
            if record.get(key) is not None:
                out[key] = _text(record, key)
    else:
        out["question"] = _text(record, "question")
        options = record.get("options")
        if not isinstance(options, list) or len(options) < 2 or \
                not all(isinstance(o, str) and o for o in options):
            raise ValueError(f"'options' must be a list of >= 2 non-empty strings, got {options!r}")
        answer = record.get("answer")
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(options):
            raise ValueError(f"'answer' must be an option index in [0, {len(options)}), got {answer!r}")
        out["options"], out["answer"] = list(options), answer
    for key, value in record.items():   # keep extra fields (clip, seconds, ...) untouched
        if not (key in ("video", "audio") and value is None):   # null media: none
            out.setdefault(key, value)
    return out


def parse_jsonl(path: str, kind: str | None = None, root: str | None = None,
                require_media: bool | None = None) -> tuple[list[dict], list[str]]:
    """(valid records, schema errors as "file:line: reason"). Invalid JSON raises RecordError.

    `root` defaults to the file's directory.
    """
    root = os.path.dirname(os.path.abspath(path)) if not root else root
    records, errors = [], []
    for number, line in jsonl_lines(path, RecordError):
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise RecordError(f"{path}:{number}: malformed JSON ({err.msg} at column "
                              f"{err.colno})") from err
        try:
            record = validate(value, kind, root, require_media)
        except ValueError as err:
            errors.append(f"{path}:{number}: {err}")
            continue
        record.setdefault("id", f"{os.path.basename(path)}:{number}")
        record.update(index=number - 1, line=number, source=str(path))
        records.append(record)
    return records, errors


def jsonl_lines(path: str, error_cls: type[Exception] = RecordError) -> Iterator[tuple[int, str]]:
    """(1-based line number, stripped text) of each non-blank line of a JSONL file; a file that
    cannot be opened, or a line that is not UTF-8, raises `error_cls` naming the file (and line)."""
    try:
        handle = open(path, "rb")
    except OSError as err:
        raise error_cls(f"{path}: cannot read ({err.strerror})") from err
    with handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as err:
                raise error_cls(f"{path}:{number}: not UTF-8 text (byte {raw[err.start]:#04x} at "
                                f"column {err.start + 1}); save the file as UTF-8") from None
            if line:
                yield number, line


def load_records(path: str, kind: str | None = None, root: str | None = None,
                 require_media: bool | None = None) -> list[dict]:
    """All records of a JSONL file; the first invalid one raises RecordError naming file:line."""
    records, errors = parse_jsonl(path, kind, root, require_media)
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise RecordError(errors[0] + more)
    return records


def from_rows(rows, kind: str | None, root: str, source: str = "<memory>") -> list[dict]:
    """In-memory rows (e.g. freshly sampled DPO pairs) -> validated records with index = position;
    the first invalid row raises RecordError naming source:position."""
    records = []
    for position, row in enumerate(rows):
        try:
            record = validate(row, kind, root)
        except ValueError as err:
            raise RecordError(f"{source}:{position + 1}: {err}") from err
        record.setdefault("id", f"{source}:{position + 1}")
        record.update(index=position, line=position + 1, source=source)
        records.append(record)
    return records


def load_split(config, split: str, kind: str | None = None) -> list[dict]:
    """Records of `config.data.<split>` (a JSONL path), media under `config.data.root` (default:
    the file's folder)."""
    path = config.data.get(split) if hasattr(config.data, "get") else None
    if not path:
        raise ValueError(f"config.data.{split} is empty: give the JSONL file of the {split} split")
    return load_records(str(path), kind=kind, root=config.data.root or None)
