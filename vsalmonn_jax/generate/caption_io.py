"""Caption job I/O: what to caption (files, folders, JSONL records) and a resumable JSONL of results.

An item is `{"id", "video", "audio", "prompt"}` (+ the record's other fields). Output lines are keyed by
(id, sample): a restarted run reads them back and only does what is missing; a line cut short by a
crash is dropped (the file is truncated to its last complete line) and redone. `<output>.settings.json`
records the model, prompt and sampling that wrote it: a resume with others is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator

from vsalmonn_jax.atomic_file import write_json
from vsalmonn_jax.data.media import AUDIO_EXTENSIONS
from vsalmonn_jax.data.records import jsonl_lines, resolve_media

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".flv")


class InputError(ValueError):
    """An input that names nothing to caption (missing path, bad JSONL line); names the place."""


def _file_item(path: str, own_track: bool = False) -> dict:
    """A media file named on the command line; `own_track`: a video's "audio" is the file itself
    (its own track, for data.video_audio=record, where a record without "audio" has no sound)."""
    full = os.path.abspath(path)
    if full.lower().endswith(AUDIO_EXTENSIONS):
        return {"id": full, "audio": full}
    return {"id": full, "video": full, **({"audio": full} if own_track else {})}


def _folder_items(folder: str, own_track: bool = False) -> list[dict]:
    found = []
    for dirpath, _, names in os.walk(folder):
        for name in names:
            if name.lower().endswith(VIDEO_EXTENSIONS + AUDIO_EXTENSIONS):
                found.append(os.path.join(dirpath, name))
    return [_file_item(p, own_track) for p in sorted(found)]


def jsonl_items(path: str, root: str | None = None) -> tuple[list[dict], list[str]]:
    """Records of a JSONL file -> (items, errors as "file:line: reason").

    Media paths resolve against `root` (default: the file's folder), as in data/records.py; the id is
    the record's "id" or "<file name>:<line>".
    """
    root = root or os.path.dirname(os.path.abspath(path))
    items, errors = [], []
    for number, line in jsonl_lines(path, InputError):
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError(f"a record must be a JSON object, got {type(record).__name__}")
            item = {k: v for k, v in record.items() if k not in ("video", "audio")}
            for key in ("video", "audio"):
                if record.get(key) is not None:
                    item[key] = resolve_media(record[key], root)
            if "video" not in item and "audio" not in item:
                raise ValueError("the record has neither 'video' nor 'audio'")
        except (ValueError, json.JSONDecodeError) as err:
            errors.append(f"{path}:{number}: {err}")
            continue
        item["id"] = str(record.get("id", f"{os.path.basename(path)}:{number}"))
        item["line"], item["source"] = number, str(path)
        items.append(item)
    return items, errors


def discover_items(inputs: Iterable[str], root: str | None = None,
                   own_track: bool = False) -> tuple[list[dict], list[str]]:
    """Files, folders (recursive, media extensions) and .jsonl files -> (items, input errors).
    `own_track`: videos named as files or folders take their own audio track whatever
    data.video_audio says (records follow it).

    The same media file named twice (a file and its folder) is captioned once; two JSONL records
    with one id raise InputError naming both lines (captions are keyed by id: one would be lost).
    A missing path is an input error, not an exception.
    """
    items, errors, seen = [], [], {}
    for path in inputs:
        if os.path.isdir(path):
            found = _folder_items(path, own_track)
            if not found:
                errors.append(f"{path}: folder holds no video or audio files")
        elif path.lower().endswith(".jsonl"):
            found, bad = jsonl_items(path, root)
            errors.extend(bad)
        elif os.path.exists(path):
            found = [_file_item(path, own_track)]
        else:
            errors.append(f"{path}: no such file or folder")
            continue
        for item in found:
            first = seen.get(item["id"])
            if first is None:
                seen[item["id"]] = item
                items.append(item)
            elif "line" in item or "line" in first:
                raise InputError(f"duplicate id {item['id']!r}: {_place(first)} and {_place(item)}; "
                                 "captions are keyed by id, give each record its own")
    return items, errors


def parse_shard(text: str) -> tuple[int, int]:
    """"K/N" (0 <= K < N) -> (K, N); ValueError with the accepted form otherwise."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard {text!r}: expected INDEX/COUNT, e.g. 0/4") from None
    if not 0 <= index < count:
        raise ValueError(f"--shard {text!r}: INDEX must be in [0, COUNT), COUNT >= 1")
    return index, count


def shard_items(items: list[dict], index: int, count: int) -> list[dict]:
    """The items of shard `index` of `count`: those whose id hashes there (SHA-256 of the id; crc32's
    low bits are affine in the input bits and put ids like clip0..clip2 all in one of two shards).

    A function of the id alone, so jobs that list the same items in any order (one per host) split
    them into disjoint shards whose union is every item, and a shard keeps its items on resume.
    """
    def shard(item_id) -> int:
        return int.from_bytes(hashlib.sha256(str(item_id).encode()).digest()[:8], "big") % count

    return [it for it in items if shard(it["id"]) == index]


def shard_output(path: str, index: int, count: int) -> str:
    """captions.jsonl -> captions-00001-of-00004.jsonl (shard 1 of 4)."""
    stem, ext = os.path.splitext(path)
    return f"{stem}-{index:05d}-of-{count:05d}{ext or '.jsonl'}"


def _place(item: dict) -> str:
    """Where an item came from: file:line for a JSONL record, else its media path."""
    if "line" in item:
        return f"{item['source']}:{item['line']}"
    return str(item.get("video") or item.get("audio"))


def whole_lines(path: str) -> list[bytes]:
    """The lines of an append-only JSONL this package writes ([] when missing); a trailing partial
    line (a crash mid-write) is cut from the file in place."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as handle:
        data = handle.read()
    end = data.rfind(b"\n") + 1
    if end < len(data):              # interrupted mid-line: drop the fragment
        with open(path, "r+b") as handle:
            handle.truncate(end)
    return data[:end].splitlines()


def read_done(path: str) -> set[tuple[str, int]]:
    """(id, sample) pairs already in an output JSONL; truncates a trailing partial line in place."""
    done = set()
    for number, line in enumerate(whole_lines(path), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            done.add((str(row["id"]), int(row.get("sample", 0))))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise InputError(f"{path}:{number}: not a caption line ({err}); refusing to resume "
                             "into a file this command did not write") from err
    return done


def settings_path(output: str) -> str:
    """The file beside a captions JSONL recording what wrote it: `<output>.settings.json`."""
    return output + ".settings.json"


# config fields a caption depends on besides the weights, the prompt and the sampling: how a file
# becomes model input (data.*) and the model's architecture / pretrained sources (model.*)
INPUT_FIELDS = ("data.tokenizer", "data.fps", "data.max_frames", "data.sample_rate",
                "data.min_audio_seconds", "data.missing_audio", "data.audio_channel",
                "data.max_length", "data.truncation", "data.prompt_format", "data.time_tokens",
                "data.audio_cut", "data.video_audio", "data.frame_sampling", "model.*")


# how the model runs, not what it computes: free to change on a resume (e.g. a smaller frame_chunk
# after an out-of-memory error); dropout and initialisers do nothing at inference
RUNTIME_FIELDS = ("model.llm.scan_layers", "model.llm.remat_policy", "model.llm.remat_names",
                  "model.llm.attention_impl", "model.llm.attention_block", "model.vision.frame_chunk",
                  "model.audio.chunk_batch", "model.lora.dropout", "model.qformer.dropout",
                  "model.qformer.initializer_range", "model.connector.initializer_range",
                  "model.vision.position_init_std")


def input_settings(config) -> dict:
    """The INPUT_FIELDS of `config` but the RUNTIME_FIELDS, flattened ({"data.fps": 1.0,
    "model.llm.num_layers": 28, ...})."""
    from vsalmonn_jax.training.run_config import as_dict, flatten

    flat = flatten(as_dict(config))
    return {k: v for k, v in flat.items() if k not in RUNTIME_FIELDS and any(
        k == f or (f.endswith(".*") and k.startswith(f[:-1])) for f in INPUT_FIELDS)}


def check_settings(output: str, settings: dict, *, write: bool = True) -> None:
    """Resuming into `output` must not mix two runs: when it holds captions written with other
    `settings` (model, prompt, sampling, input config fields, ...), InputError naming each change;
    else (write=True) the settings are recorded beside it. A field the record lacks (written by an
    older version) is not compared; an older file without a record is taken as this run's.
    write=False only compares (a check before the model is loaded)."""
    path = settings_path(output)
    has_rows = os.path.exists(output) and os.path.getsize(output) > 0
    if has_rows and os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as handle:
                saved = json.load(handle)
        except (OSError, ValueError) as err:
            raise InputError(f"{path}: unreadable ({err}); delete it to resume {output} as is") from err
        changed = {k: (saved[k], v) for k, v in json.loads(json.dumps(settings)).items()
                   if k in saved and saved[k] != v}
        if changed:
            raise InputError(
                f"{output} holds captions written with other settings ("
                + "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
                + "): resuming would mix two runs in one file; write to another --output, or delete "
                "it (and its settings file) to start over")
        return
    if write:
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        write_json(path, settings, indent=1)


class JsonlWriter:
    """Append-only JSONL; each `write_many` is flushed and fsynced so a kill loses at most a line."""

    def __init__(self, path: str):
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        self.path = path
        self._handle = open(path, "a", encoding="utf-8")

    def write_many(self, rows: Iterable[dict]) -> None:
        for row in rows:
            self._handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def pending(items: list[dict], num_samples: int, done: set[tuple[str, int]]) -> Iterator[tuple[dict, int]]:
    """(item, sample index) pairs still to caption, item-major."""
    for item in items:
        for sample in range(num_samples):
            if (item["id"], sample) not in done:
                yield item, sample
