"""JAX's persistent compilation cache for every command: a second `demo`, `caption` or `train` with the
same shapes loads its executables from disk instead of recompiling them.

Where: `$VSALMONN_JAX_CACHE_DIR` if set (`off` disables it), else `$XDG_CACHE_HOME/vsalmonn_jax/xla`
(`~/.cache/vsalmonn_jax/xla`). Entries are keyed by JAX on the computation, the devices and the
compiler version, so one folder serves every config, topology and checkout. Size: at each start, the
least recently used entries beyond `$VSALMONN_JAX_CACHE_MAX_GB` (default 10; `unlimited` keeps all)
are deleted (`trim`). Multi-host runs: each process reads, writes and trims the folder it sees (a
shared filesystem shares it); multi-process CPU runs go uncached (`off_for_multiprocess_cpu`).
"""

from __future__ import annotations

import math
import os
import pathlib
import sys

ENV = "VSALMONN_JAX_CACHE_DIR"
# Only compilations slower than this are written. 0: every one (a second `demo --quick` also skips
# its many sub-0.5-s compiles: bench/demo_cache.py 2.124 and 2.15 with 90 files, against 1.97 and
# 1.95 with 17 at 0.5, 2026-12-08; an earlier measurement, before QA option packing, saw no
# difference). The test suite keeps 0.5 (tests/conftest.py: the cold suite was no faster at 0).
MIN_COMPILE_SECONDS = 0.0
MAX_GB_ENV = "VSALMONN_JAX_CACHE_MAX_GB"
DEFAULT_MAX_GB = 10.0
ENTRY = "*-cache"   # JAX's entry files (XLA's own caches, in sub-folders, are not touched)


def cache_dir() -> pathlib.Path | None:
    """The folder in use (None when switched off with VSALMONN_JAX_CACHE_DIR=off)."""
    value = os.environ.get(ENV, "").strip()
    if value.lower() in ("off", "none", "0", "false"):
        return None
    if value:
        return pathlib.Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "vsalmonn_jax" / "xla"


def max_bytes() -> float:
    """The size the folder is trimmed to: $VSALMONN_JAX_CACHE_MAX_GB GB (inf = unlimited)."""
    value = os.environ.get(MAX_GB_ENV, "").strip().lower()
    if value in ("unlimited", "off", "none", "inf"):
        return math.inf
    try:
        gb = float(value) if value else DEFAULT_MAX_GB
    except ValueError:
        gb = -1.0
    if not gb > 0 or math.isinf(gb):
        raise ValueError(f"{MAX_GB_ENV}={os.environ[MAX_GB_ENV]!r}: give a size in GB > 0 (e.g. 10) "
                         "or 'unlimited'")
    return gb * 1e9


def trim(folder: pathlib.Path, limit: float) -> tuple[int, int]:
    """Delete the least recently used entries (oldest access or write time first) until the folder's
    entries take at most `limit` bytes; returns (entries deleted, bytes freed). An entry another
    process deletes or reads meanwhile is safe: a missing entry is a cache miss."""
    entries = []
    for path in folder.glob(ENTRY):
        try:
            stat = path.stat()
        except OSError:
            continue
        entries.append((max(stat.st_atime, stat.st_mtime), stat.st_size, path))
    total = sum(size for _, size, _ in entries)
    deleted = freed = 0
    for _, size, path in sorted(entries, key=lambda e: (e[0], e[2].name)):
        if total - freed <= limit:
            break
        try:
            path.unlink()
            deleted += 1
        except FileNotFoundError:
            pass
        except OSError:
            continue
        freed += size
    return deleted, freed


def off_for_multiprocess_cpu() -> bool:
    """Switch the cache off in a multi-process run on CPU devices (call after jax.distributed starts);
    True when it did. Measured here: a 2-process CPU mrDPO round with the cache warm from an
    identical earlier run hung in its first train step, every process waiting in the step's
    collectives (5 of 5 tries); the same run uncached, or with the cache cold, finished. GPU / TPU
    runs keep it."""
    import jax

    if jax.process_count() == 1 or jax.default_backend() != "cpu":
        return False
    os.environ[ENV] = "off"
    jax.config.update("jax_enable_compilation_cache", False)
    return True


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
    limit = max_bytes()
    deleted, freed = trim(pathlib.Path(os.environ["JAX_COMPILATION_CACHE_DIR"]), limit)
    if deleted:
        print(f"compile cache {os.environ['JAX_COMPILATION_CACHE_DIR']}: removed the {deleted} least "
              f"recently used entries ({freed / 1e9:.2f} GB) to stay under {limit / 1e9:g} GB "
              f"(${MAX_GB_ENV})", file=sys.stderr)
    if "jax" in sys.modules:
        import jax

        for name, (kind, _) in settings.items():
            jax.config.update(name.lower(), kind(os.environ[name]))
    return pathlib.Path(os.environ["JAX_COMPILATION_CACHE_DIR"])
