"""metrics.jsonl (+ TensorBoard) of a run: whole lines only, and on resume no rows beyond the restored
checkpoint's step, so a run killed anywhere (kill -9, disk full) resumes into a clean file."""

from __future__ import annotations

import json
import os
import pathlib

import jax

from vsalmonn_jax.atomic_file import write_text


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def append_line(path: pathlib.Path, line: str) -> None:
    """Append `line` + newline whole or not at all: a failed write (disk full) is cut back to the
    file's previous end before the error propagates (naming the file)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        start = os.lseek(fd, 0, os.SEEK_END)
        try:
            _write_all(fd, (line + "\n").encode())
        except OSError as err:
            try:
                os.ftruncate(fd, start)
            except OSError:
                pass   # repaired on the next open (repair_jsonl)
            raise OSError(err.errno, f"{path}: could not append a metrics row ({err.strerror}); "
                                     f"the file keeps its whole lines only") from err
    finally:
        os.close(fd)


def repair_jsonl(path: pathlib.Path, max_step: int) -> tuple[int, int]:
    """Drop a trailing partial / unparsable line and rows with "step" > `max_step` (written after the
    checkpoint a resume restores). Rewrites the file atomically; returns (partial dropped, rows dropped)."""
    if not path.is_file():
        return 0, 0
    text = path.read_text(errors="replace")
    lines = text.split("\n")
    tail = lines.pop()   # "" when the file ends with a newline
    partial = int(bool(tail.strip()))
    keep, dropped = [], 0
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            partial += 1   # a torn line in the middle (an earlier partial write): not a row
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] > max_step:
            dropped += 1
            continue
        keep.append(line)
    if partial or dropped:
        write_text(path, "".join(line + "\n" for line in keep))
    return partial, dropped


def logged_row(path: pathlib.Path, step: int, split: str = "train") -> dict[str, float]:
    """The scalars logged at `step` in a metrics.jsonl ({} if none): a run resumed at its end runs
    no step, and reports the last one from here."""
    row: dict[str, float] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("step") == step and record.get("split") == split:
                row = {k: v for k, v in record.items() if k not in ("step", "split")}
    return row


class MetricsWriter:
    """Scalars to `metrics.jsonl` (appended across resumes) and TensorBoard, from process 0 only.
    `resume_step`: the step training continues from; rows beyond it are removed first."""

    def __init__(self, workdir: pathlib.Path, tensorboard: bool = True, resume_step: int = 0):
        self.enabled = jax.process_index() == 0
        self.path = workdir / "metrics.jsonl"
        self.tb = None
        self.repaired = (0, 0)
        if self.enabled:
            workdir.mkdir(parents=True, exist_ok=True)
            self.repaired = repair_jsonl(self.path, resume_step)
            if tensorboard:
                from tensorboardX import SummaryWriter
                self.tb = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, step: int, scalars: dict[str, float], split: str = "train") -> None:
        if not self.enabled:
            return
        append_line(self.path, json.dumps({"step": step, "split": split, **scalars}))
        if self.tb is not None:
            for name, value in scalars.items():
                self.tb.add_scalar(f"{split}/{name}", value, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
