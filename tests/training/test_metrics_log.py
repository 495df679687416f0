"""metrics.jsonl (training/metrics_log.py): a disk-full write leaves no partial line, a partial line
left by a crash is repaired on open, and a resume drops rows beyond the restored checkpoint's step."""

import errno
import json

import pytest

from vsalmonn_jax.training import metrics_log
from vsalmonn_jax.training.metrics_log import MetricsWriter


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_disk_full_leaves_only_whole_lines(tmp_path, monkeypatch):
    writer = MetricsWriter(tmp_path, tensorboard=False)
    writer.write(1, {"loss": 1.0})
    real = metrics_log.os.write

    def half_then_full(fd, data):   # the disk fills up in the middle of the row
        real(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(metrics_log.os, "write", half_then_full)
    with pytest.raises(OSError, match="metrics.jsonl: could not append a metrics row .No space left"):
        writer.write(2, {"loss": 0.5})
    monkeypatch.undo()
    assert (tmp_path / "metrics.jsonl").read_text().endswith("\n")
    assert [r["step"] for r in _rows(tmp_path / "metrics.jsonl")] == [1]
    resumed = MetricsWriter(tmp_path, tensorboard=False, resume_step=1)
    resumed.write(2, {"loss": 0.5})
    assert [r["step"] for r in _rows(tmp_path / "metrics.jsonl")] == [1, 2]


def test_partial_trailing_line_is_repaired_on_open(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "split": "train", "loss": 1.0}\n{"step": 2, "spl')
    writer = MetricsWriter(tmp_path, tensorboard=False, resume_step=2)
    assert writer.repaired == (1, 0)
    writer.write(2, {"loss": 0.5})
    assert [r["step"] for r in _rows(path)] == [1, 2]


def test_resume_drops_rows_after_the_restored_step(tmp_path):
    writer = MetricsWriter(tmp_path, tensorboard=False)
    for step in range(1, 6):   # checkpoint at 3, killed (-9) after logging step 5
        writer.write(step, {"loss": 1.0 / step})
    writer.write(3, {"loss": 0.1}, split="eval")
    resumed = MetricsWriter(tmp_path, tensorboard=False, resume_step=3)
    assert resumed.repaired == (0, 2)
    for step in (4, 5, 6):
        resumed.write(step, {"loss": 0.0})
    rows = _rows(tmp_path / "metrics.jsonl")
    train = [r["step"] for r in rows if r["split"] == "train"]
    assert train == [1, 2, 3, 4, 5, 6] and [r["step"] for r in rows if r["split"] == "eval"] == [3]
