"""The caption run's errors file across resumes: one line per unreadable item, a crash's partial line
cut off, the line of an item that now reads dropped."""

import json

import pytest

from vsalmonn_jax.generate.caption_io import InputError
from vsalmonn_jax.generate.caption_run import UnreadableInput, run_captions


class Backend:
    batch_size = 2

    def __init__(self, bad=()):
        self.bad, self.prepared = set(bad), []

    def prepare(self, item):
        self.prepared.append(item["id"])
        if item["id"] in self.bad:
            raise UnreadableInput(f"corrupt {item['id']}")
        return item["id"]

    def caption(self, rows):
        return [{"caption": f"{prep} #{sample}", "stopped": True, "num_tokens": 1, "logprob": 0.0}
                for _, sample, prep in rows]


def _items(*ids):
    return [{"id": i, "video": f"{i}.mp4"} for i in ids]


def _run(tmp_path, items, bad=()):
    backend = Backend(bad)
    summary = run_captions(items, backend, output=str(tmp_path / "out.jsonl"),
                           errors_output=str(tmp_path / "err.jsonl"), progress=False,
                           warn=lambda text: None)
    return summary, backend


def _errors(tmp_path):
    return [json.loads(line) for line in (tmp_path / "err.jsonl").read_text().splitlines()]


def test_resumes_retry_an_unreadable_item_but_list_it_once(tmp_path):
    items = _items("a", "bad", "c")
    for _ in range(3):
        summary, backend = _run(tmp_path, items, bad={"bad"})
        assert [f["id"] for f in summary.failed] == ["bad"]   # retried and reported each run
    assert backend.prepared == ["bad"]                        # a, c were done by the first run
    assert _errors(tmp_path) == [{"id": "bad", "video": "bad.mp4", "audio": None, "error": "corrupt bad"}]


def test_a_partial_last_line_is_cut_and_earlier_lines_kept(tmp_path):
    err = tmp_path / "err.jsonl"
    err.write_text(json.dumps({"id": "old", "video": "old.mp4", "audio": None, "error": "gone"})
                   + '\n{"id": "bad", "vid')                  # a crash in the middle of a line
    _run(tmp_path, _items("a", "bad"), bad={"bad"})
    assert [r["id"] for r in _errors(tmp_path)] == ["old", "bad"]
    assert err.read_text().endswith("\n")


def test_the_line_of_an_item_that_now_reads_is_dropped(tmp_path):
    _run(tmp_path, _items("a", "b", "c"), bad={"b", "c"})
    assert [r["id"] for r in _errors(tmp_path)] == ["b", "c"]
    summary, _ = _run(tmp_path, _items("a", "b", "c"), bad={"c"})    # b was fixed
    assert summary.written == 1 and [f["id"] for f in summary.failed] == ["c"]
    assert [r["id"] for r in _errors(tmp_path)] == ["c"]


def test_repeated_lines_of_an_older_run_collapse_to_the_latest_reason(tmp_path):
    (tmp_path / "err.jsonl").write_text("".join(
        json.dumps({"id": "bad", "video": "bad.mp4", "audio": None, "error": "old reason"}) + "\n"
        for _ in range(3)))
    _run(tmp_path, _items("a", "bad"), bad={"bad"})
    assert _errors(tmp_path) == [{"id": "bad", "video": "bad.mp4", "audio": None, "error": "corrupt bad"}]


def test_a_foreign_errors_file_is_refused(tmp_path):
    (tmp_path / "err.jsonl").write_text('{"text": "not ours"}\n')
    with pytest.raises(InputError, match="err.jsonl:1: not an errors line"):
        _run(tmp_path, _items("a"))
