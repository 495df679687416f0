"""JSONL schemas: valid kinds, errors naming file:line, media paths confined to the data root."""

import json
import os
import re

import pytest

from vsalmonn_jax.data.records import RecordError, load_records, parse_jsonl, resolve_media


def _write(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


GOOD = [
    {"video": "a.mp4", "conversations": [{"role": "user", "content": "<media>\nhi"},
                                         {"role": "assistant", "content": "yo"}]},
    {"video": "a.mp4", "conversations": [{"from": "human", "value": "<image>\nhi"},
                                         {"from": "gpt", "value": "yo"}]},
    {"video": "a.mp4", "prompt": "Describe.", "chosen": "c", "rejected": "r", "gt": "g"},
    {"audio": "a.wav", "prompt": "Describe.", "gt": "g"},
    {"video": "a.mp4", "events": [{"time": 1, "modality": "audio", "subject": "a low beep",
                                   "action": "sounds", "text": "At 1 s, a low beep sounds."}]},
    {"video": "a.mp4", "question": "Q?", "options": ["x", "y", "z"], "answer": 2},
]


def test_every_kind_validates(tmp_path):
    records = load_records(_write(tmp_path / "ok.jsonl", GOOD))
    assert [r["kind"] for r in records] == ["sft", "sft", "preference", "preference", "caption", "mcq"]
    assert records[1]["conversations"][1] == {"role": "assistant", "content": "yo"}
    assert records[0]["video"] == os.path.realpath(tmp_path / "a.mp4")
    assert [r["index"] for r in records] == list(range(6)) and records[5]["line"] == 6
    assert records[3]["chosen"] is None and records[3]["gt"] == "g"


@pytest.mark.parametrize("row,message", [
    ({"video": "a.mp4", "conversations": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"video": "a.mp4", "prompt": "p", "chosen": "c"}, "come together"),
    ({"prompt": "p", "gt": "g"}, "needs a 'video' or 'audio'"),
    ({"video": "a.mp4", "events": [{"time": -1, "modality": "audio", "subject": "s",
                                    "action": "a"}]}, r"events\[0\].time"),
    ({"video": "a.mp4", "events": [{"time": 1, "modality": "smell", "subject": "s",
                                    "action": "a"}]}, "modality"),
    ({"video": "a.mp4", "question": "Q?", "options": ["x", "y"], "answer": 2}, "answer"),
    ({"video": "a.mp4", "question": "Q?", "options": ["x"], "answer": 0}, "options"),
    ({"video": "../outside.mp4", "events": []}, "escapes the data root"),
    ({"video": "/etc/passwd", "events": []}, "escapes the data root"),
    ([1, 2], "JSON object"),
    # JSON's NaN / Infinity literals, list-typed ids, list-typed logps, untimed events without text
    ('{"video": "a.mp4", "events": [{"time": NaN, "modality": "audio", "subject": "s", '
     '"action": "a"}]}', r"events\[0\].time must be a finite number >= 0 .* got nan"),
    ('{"video": "a.mp4", "events": [{"time": Infinity, "text": "A dog barks."}]}',
     r"events\[0\].time must be a finite number .* got inf"),
    ({"video": "a.mp4", "id": ["a", "b"], "events": []}, "field 'id' must be a string or an integer"),
    ({"video": "a.mp4", "prompt": "p", "chosen": "c", "rejected": "r", "ref_chosen_logps": [-1.0],
      "ref_rejected_logps": -2.0}, r"'ref_chosen_logps' must be a finite number .* got \[-1.0\]"),
    ({"video": "a.mp4", "events": [{"time": None, "modality": "audio", "subject": "s",
                                    "action": "a"}]}, r"events\[0\] has no 'time' \(or it is null\) and no 'text'"),
    ({"video": "a.mp4", "events": ["A dog barks.", "  "]}, r"events\[1\] is an empty string"),
    # the release's image and segment records: refused with the reason (were trained on as if
    # the field were absent: text only / the whole video)
    ({"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nQ?"},
                                          {"from": "gpt", "value": "A."}]}, "image records are not supported"),
    ({"video": "a.mp4", "timestamps": [3, 9], "events": []}, "segment records"),
])
def test_schema_errors_name_file_and_line(tmp_path, row, message):
    path = _write(tmp_path / "bad.jsonl", [GOOD[0], row])
    records, errors = parse_jsonl(path)
    assert len(records) == 1 and len(errors) == 1
    assert errors[0].startswith(f"{path}:2: ")
    assert re.search(message, errors[0])
    with pytest.raises(RecordError, match="bad.jsonl:2: "):
        load_records(path)


def test_null_media_is_no_media(tmp_path):
    """`"video": null` in an SFT record was put back as video None: the featurizer then crashed
    the loader (load_media needs a path) instead of training the text."""
    path = _write(tmp_path / "null.jsonl", [{"video": None, "conversations": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}])
    (record,) = load_records(path)
    assert "video" not in record and record["kind"] == "sft"
    # per-sentence timestamps (ActivityNet style) are not the release's [start, end]: kept as before
    dense = _write(tmp_path / "dense.jsonl", [dict(GOOD[0], timestamps=[[0, 2.5], [2.5, 6]])])
    assert load_records(dense)[0]["timestamps"] == [[0, 2.5], [2.5, 6]]


def test_malformed_json_stops_with_file_and_line(tmp_path):
    path = _write(tmp_path / "broken.jsonl", [GOOD[0], "", '{"video": "a.mp4", ', GOOD[1]])
    with pytest.raises(RecordError, match=r"broken.jsonl:3: malformed JSON"):
        parse_jsonl(path)


def test_symlink_escaping_root_is_refused(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "secret.mp4").write_bytes(b"x")
    os.symlink(tmp_path / "secret.mp4", root / "link.mp4")
    with pytest.raises(ValueError, match="escapes"):
        resolve_media("link.mp4", str(root))
    inside = root / "sub"
    inside.mkdir()
    assert resolve_media("sub/../x.mp4", str(root)) == os.path.realpath(root / "x.mp4")
    assert resolve_media(str(root / "x.mp4"), str(root)) == os.path.realpath(root / "x.mp4")


def test_explicit_root_and_kind(tmp_path):
    path = _write(tmp_path / "r.jsonl", [{"video": "clips/a.mp4", "events": []}])
    records = load_records(path, kind="caption", root=str(tmp_path / "data"))
    assert records[0]["video"] == os.path.realpath(tmp_path / "data" / "clips" / "a.mp4")
    with pytest.raises(RecordError, match="r.jsonl:1: .*'question'"):
        load_records(path, kind="mcq")


def test_load_split_from_config(tmp_path):
    from vsalmonn_jax.config import load_config
    from vsalmonn_jax.data.records import load_split

    path = _write(tmp_path / "train.jsonl", GOOD[:2])
    config = load_config("tiny", [f"data.train={path}", f"data.root={tmp_path / 'media'}"])
    records = load_split(config, "train")
    assert len(records) == 2 and records[0]["video"] == os.path.realpath(tmp_path / "media" / "a.mp4")
    with pytest.raises(ValueError, match="config.data.val is empty"):
        load_split(config, "val")


def test_rows_in_memory(tmp_path):
    from vsalmonn_jax.data.records import from_rows

    records = from_rows(GOOD[2:4], "preference", str(tmp_path), source="round1")
    assert [r["index"] for r in records] == [0, 1] and records[1]["id"] == "round1:2"
    with pytest.raises(RecordError, match="round1:2: .*needs chosen"):
        from_rows([GOOD[2], {"video": "a.mp4", "prompt": "p"}], "preference", str(tmp_path),
                  source="round1")


def test_free_text_events_validate(tmp_path):
    """The official test set's form: events as plain strings (or text with an optional time)."""
    rows = [{"id": 7, "video": "a.mp4", "events": ["A man opens the door.", "A dog barks twice."]},
            {"id": "b", "video": "a.mp4", "events": [{"text": "Rain falls.", "time": None},
                                                      {"text": "A bell rings.", "time": 3.5}]}]
    records = load_records(_write(tmp_path / "free.jsonl", rows))
    assert [r["kind"] for r in records] == ["caption", "caption"] and records[0]["id"] == "7"
    assert records[0]["events"] == rows[0]["events"] and records[1]["events"] == rows[1]["events"]


def test_non_utf8_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(GOOD[0]).encode() + b"\n" +
                     '{"video": "a.mp4", "prompt": "caf\u00e9", "gt": "g"}\n'.encode("latin-1"))
    with pytest.raises(RecordError, match=r"latin1.jsonl:2: not UTF-8 text \(byte 0xe9 at column "
                       r"\d+\); save the file as UTF-8"):
        parse_jsonl(str(path))


def test_release_dpo_records_become_preference_records(tmp_path):
    """The release's DPO data form (human / gpt / reject_gpt / gt turns; "ce_only": true) was read as
    an SFT record and refused for its roles; it is our preference record."""
    human = {"from": "human", "value": "<image>\nPlease describe the video in detail."}
    rows = [
        {"video": "a.mp4", "conversations": [human, {"from": "gpt", "value": "good"},
                                             {"from": "reject_gpt", "value": "bad"},
                                             {"from": "gt", "value": "truth"}]},
        {"video": "a.mp4", "conversations": [human, {"from": "reject_gpt", "value": "bad"},
                                             {"from": "gpt", "value": "good"}]},
        {"video": "a.mp4", "ce_only": True, "conversations": [human, {"from": "gpt", "value": "cap"}]},
    ]
    pair, no_gt, ce = load_records(_write(tmp_path / "dpo.jsonl", rows))
    assert pair["kind"] == "preference" and "conversations" not in pair
    assert (pair["prompt"], pair["chosen"], pair["rejected"], pair["gt"]) == (
        human["value"], "good", "bad", "truth")
    assert (no_gt["chosen"], no_gt["rejected"], no_gt["gt"]) == ("good", "bad", None)
    assert ce["kind"] == "preference" and ce["gt"] == "cap" and ce["chosen"] is None
    assert "ce_only" not in ce
    bad = [
        {"video": "a.mp4", "conversations": [human, {"from": "history_gpt", "value": "x"}, human,
                                             {"from": "gpt", "value": "g"},
                                             {"from": "reject_gpt", "value": "b"}]},
        {"video": "a.mp4", "conversations": [human, {"from": "gpt", "value": "g"},
                                             {"from": "gt", "value": "t"}]},
    ]
    _, errors = parse_jsonl(_write(tmp_path / "bad.jsonl", bad))
    assert "bad.jsonl:1: a release DPO record with history" in errors[0]
    assert "bad.jsonl:2: a release DPO record with a 'gt' turn but no 'reject_gpt'" in errors[1]
    # a plain release SFT record stays SFT
    assert load_records(_write(tmp_path / "sft.jsonl", [GOOD[1]]))[0]["kind"] == "sft"
