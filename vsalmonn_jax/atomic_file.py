"""Write a file whole or not at all: a temporary file beside the target, renamed over it on success.

A crash, kill or full disk mid-write leaves the old file (or none) and no partial one; the temporary
file is removed on error. Every JSON / JSONL / array file a run reads back is written through here.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import IO, Any


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """`open(path, mode)` that replaces `path` only when the block ends without an exception; the
    folder is created if missing.

    The temporary name carries the process and thread ids, so concurrent writers of one path never
    share a temporary file (the last rename wins); it is created with open(), so the umask applies.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode 'w' or 'wb', not {mode!r}")
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path) as f:
        f.write(text)


def write_json(path: str | os.PathLike, value: Any, **dumps: Any) -> None:
    """json.dumps(value, **dumps) (e.g. indent=1, default=float) written atomically."""
    write_text(path, json.dumps(value, **dumps))


def write_jsonl(path: str | os.PathLike, rows: Iterable[Mapping], *,
                ensure_ascii: bool = True) -> None:
    """One JSON object per line, written atomically. ensure_ascii (json's default) escapes non-ASCII
    text, so a reader in any locale gets the same rows; False keeps it readable (UTF-8)."""
    with atomic_open(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=ensure_ascii) + "\n")
