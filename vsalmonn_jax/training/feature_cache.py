"""Opt-in on-disk cache of the frozen encoders' outputs (design decision 13), one .npz per example.

Key = hash of the example's raw media inputs (e.g. pixel_values + mel rows) under a fingerprint of
the task's encoder config and frozen weights, so later epochs, stages and mrDPO rounds skip SigLIP /
Whisper entirely. A batch whose rows are all cached travels to the step as "features/<name>" arrays
without its raw media; the steps then skip `task.encode`. Single-process runs (rows are host-local).
"""

from __future__ import annotations

import hashlib
import os
import pathlib

import jax
import numpy as np

from vsalmonn_jax.atomic_file import atomic_open

FEATURE_PREFIX = "features/"


def tree_digest(tree) -> str:
    """Content hash of a pytree of arrays (frozen weights), in leaf order."""
    h = hashlib.blake2b(digest_size=16)
    for leaf in jax.tree.leaves(tree):
        h.update(np.ascontiguousarray(jax.device_get(leaf)).tobytes())
    return h.hexdigest()


class FeatureCache:
    """Per-row cache of `task.encode` outputs under `directory/<fingerprint>/`."""

    def __init__(self, directory: str | os.PathLike, task, params, encode_fn):
        if jax.process_count() > 1:
            raise NotImplementedError("train.feature_cache supports single-process runs only")
        self.raw_keys = tuple(getattr(task, "raw_media_keys", ()))
        if not self.raw_keys:
            raise ValueError(f"{type(task).__name__} declares no raw_media_keys to cache")
        fingerprint = hashlib.blake2b(
            (repr(getattr(task, "encoder_fingerprint", type(task).__name__)) + tree_digest(params)
             ).encode(), digest_size=12).hexdigest()
        self.directory = pathlib.Path(directory) / fingerprint
        self.directory.mkdir(parents=True, exist_ok=True)
        self.encode_fn = encode_fn  # host batch -> {name: host array [B, ...]} of new features
        self.hits = self.misses = 0

    def row_key(self, batch: dict, row: int) -> str:
        h = hashlib.blake2b(digest_size=20)
        for name in self.raw_keys:
            if name in batch:
                x = np.ascontiguousarray(batch[name][row])
                h.update(f"{name}{x.dtype}{x.shape}".encode())
                h.update(x.tobytes())
        return h.hexdigest()

    def _path(self, key: str) -> pathlib.Path:
        return self.directory / key[:2] / f"{key}.npz"

    def _load(self, key: str) -> dict | None:
        path = self._path(key)
        if not path.exists():
            return None
        with np.load(path) as f:
            return {k: f[k] for k in f.files}

    def _save(self, key: str, arrays: dict) -> None:
        with atomic_open(self._path(key), "wb") as f:
            np.savez(f, **arrays)

    def attach(self, batch: dict) -> dict:
        """The batch with "features/<name>" rows (cached or computed now) instead of raw media."""
        if not any(k in batch for k in self.raw_keys):
            return batch
        size = len(batch[next(k for k in self.raw_keys if k in batch)])
        keys = [self.row_key(batch, i) for i in range(size)]
        rows = [self._load(k) for k in keys]
        if any(r is None for r in rows):
            computed = self.encode_fn(batch)
            for i, key in enumerate(keys):
                if rows[i] is None:
                    rows[i] = {name: np.asarray(v[i]) for name, v in computed.items()}
                    self._save(key, rows[i])
                    self.misses += 1
                else:
                    self.hits += 1
        else:
            self.hits += size
        out = {k: v for k, v in batch.items() if k not in self.raw_keys}
        for name in rows[0]:
            out[FEATURE_PREFIX + name] = np.stack([r[name] for r in rows])
        return out


def cached_features(batch: dict) -> dict:
    """{name: array} of the "features/<name>" fields of a (traced) batch; {} if none."""
    return {k[len(FEATURE_PREFIX):]: v for k, v in batch.items() if k.startswith(FEATURE_PREFIX)}
