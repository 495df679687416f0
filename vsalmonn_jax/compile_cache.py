"""JAX's persistent compilation cache for every command: a second `demo`, `caption` or `train` with the
same shapes loads its executables from disk instead of recompiling them.

Where: `$VSALMONN_JAX_CACHE_DIR` if set (`off` disables it), else `$XDG_CACHE_HOME/vsalmonn_jax/xla`
(`~/.cache/vsalmonn_jax/xla`). Entries are keyed by JAX on the computation, the devices and the
compiler version, so one folder serves every config, topology and checkout; delete it to free space.
Multi-host runs: each process reads and writes the folder it sees (a shared filesystem shares it).
"""

from __future__ import annotations

import os
import pathlib
import sys

ENV = "VSALMONN_JAX_CACHE_DIR"
# Only compilations slower than this are written: tiny helper jits (casts, broadcasts) recompile in
# milliseconds and would only add files. Measured (bench/demo_cache.py): 0 instead of 0.5 gave the same
# second-vs-first `demo --quick` ratio (2.078 vs 2.079 in CPU time) with 79 files instead of 22.
MIN_COMPILE_SECONDS = 0.5


def cache_dir() -> pathlib.Path | None:
    """The folder in use (None when switched off with VSALMONN_JAX_CACHE_DIR=off)."""
    value = os.environ.get(ENV, "").strip()
    if value.lower() in ("off", "none", "0", "false"):
        return None
    if value:
        return pathlib.Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "vsalmonn_jax" / "xla"


def enable() -> pathlib.Path | None:
    """Point JAX at the cache folder before the first compilation (idempotent).

    Sets JAX's own environment variables (a user's JAX_COMPILATION_CACHE_DIR wins), so nothing is
    imported here and the settings reach worker processes; if JAX is already imported, its config
    is updated directly.
    """
    folder = cache_dir()
    if folder is None:
        return None
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:   # a read-only home: run uncached rather than fail
        return None
    settings = {"JAX_COMPILATION_CACHE_DIR": (str, str(folder)),
                "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": (float, str(MIN_COMPILE_SECONDS)),
                "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": (int, "0")}
    for name, (_, value) in settings.items():
        os.environ.setdefault(name, value)
    if "jax" in sys.modules:
        import jax

        for name, (kind, _) in settings.items():
            jax.config.update(name.lower(), kind(os.environ[name]))
    return pathlib.Path(os.environ["JAX_COMPILATION_CACHE_DIR"])
