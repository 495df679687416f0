"""atomic_file: a write that fails part-way leaves the previous file and no temporary one."""

import json
import os
import stat

import pytest

from vsalmonn_jax.atomic_file import atomic_open, write_json, write_jsonl


def test_a_write_that_fails_midway_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "stats.json"
    write_json(path, {"round": 1})
    with pytest.raises(OSError, match="No space left"):
        with atomic_open(path) as f:
            f.write('{"round": 2, "hist')    # half a file, then the disk fills up
            raise OSError(28, "No space left on device")
    assert json.loads(path.read_text()) == {"round": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.json"]


def test_a_finished_write_replaces_the_file_and_obeys_the_umask(tmp_path):
    path = tmp_path / "sub" / "rows.jsonl"     # the folder is created
    old = os.umask(0o022)
    try:
        write_jsonl(path, [{"id": "é"}, {"id": 2}])
    finally:
        os.umask(old)
    assert path.read_bytes() == b'{"id": "\\u00e9"}\n{"id": 2}\n'   # ASCII: any reader's locale
    assert stat.S_IMODE(path.stat().st_mode) == 0o644   # not mkstemp's 0600: readable by others
    write_jsonl(path, [{"id": "é"}], ensure_ascii=False)
    assert path.read_text(encoding="utf-8") == '{"id": "é"}\n'
    write_jsonl(path, [])
    assert path.read_text() == ""


def test_only_whole_file_modes_are_accepted(tmp_path):
    with pytest.raises(ValueError, match="whole files"):
        with atomic_open(tmp_path / "x", "a"):
            pass
