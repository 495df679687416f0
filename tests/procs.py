"""Process checks from /proc for the tests that start processes (burners, data workers): is a pid still
running (a zombie counts as gone)?"""

from __future__ import annotations

import pathlib


def alive(pid: int) -> bool:
    """True while `pid` runs (not a zombie); False once it has exited."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"
