"""Decode once: decoded + featurised media per file in .npz, keyed by content hash + feature settings.

Later epochs and mrDPO rounds read the cache instead of decoding; writes are atomic (tmp + rename).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping

import numpy as np

from vsalmonn_jax.atomic_file import atomic_open


def file_digest(path: str, block: int = 1 << 20) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


# bumped whenever decoding changes what the same settings give (2: the release's frame steps under
# frame_sampling=file at every length, audio-only records cut under audio_cut=video; 3: rotated
# video upright, audio past an estimated duration kept, a held last frame not "truncated", file
# sampling's frames matched exactly)
DECODE_VERSION = 3


def media_key(paths: Mapping[str, str | None], settings: Mapping) -> str:
    """Cache key of a record's media: the content of each file, the feature settings and the
    decoder's version (an older entry is not reused)."""
    parts = {name: (file_digest(p) if p else None) for name, p in sorted(paths.items())}
    blob = json.dumps({"files": parts, "settings": dict(settings), "decode": DECODE_VERSION},
                      sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()


def load(cache_dir: str, key: str) -> dict[str, np.ndarray] | None:
    path = os.path.join(cache_dir, key[:2], f"{key}.npz")
    if not os.path.exists(path):
        return None
    try:
        with np.load(path) as data:
            return {name: data[name] for name in data.files}
    except (OSError, ValueError, EOFError):   # a damaged entry is recomputed, not trusted
        return None


def save(cache_dir: str, key: str, arrays: Mapping[str, np.ndarray]) -> None:
    with atomic_open(os.path.join(cache_dir, key[:2], f"{key}.npz"), "wb") as f:
        np.savez(f, **arrays)
