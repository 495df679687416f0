"""The Python API: `Captioner.from_pretrained(run_or_checkpoint).caption("video.mp4")` -> str.

A thin front over the `caption` command's pieces (generate/run_dir.py finds the run's config and
tokenizer, generate/backend.py loads the model once, generate/caption_run.py batches the rows).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Sequence

PathLike = str | os.PathLike


class Captioner:
    """A loaded model that captions videos (or audio files). Build it with `from_pretrained`."""

    def __init__(self, backend, config, description: str):
        self.backend, self.config, self.description = backend, config, description

    @classmethod
    def from_pretrained(cls, path: PathLike, *, config: str | None = None,
                        overrides: Sequence[str] = (), tokenizer: str | None = None,
                        step: int | None = None, batch_size: int = 8,
                        max_new_tokens: int | None = None, seed: int | None = None,
                        **sampling) -> Captioner:
        """Load a run (a train workdir, a `vsalmonn-jax demo` run directory or one of its stages, an
        orbax checkpoints folder) with the config and tokenizer the run saved. `config` /
        `overrides` ("a.b=value") / `tokenizer` override them as the CLI flags do; `sampling`
        (greedy, temperature, top_p, top_k) sets the default decoding (config.generate)."""
        from vsalmonn_jax.generate.backend import open_backend
        from vsalmonn_jax.generate.run_dir import resolve_config

        cfg, run_dir, _ = resolve_config(path, config, list(overrides))
        if tokenizer:
            cfg.data.tokenizer = str(tokenizer)
        backend, description = open_backend(
            cfg, run_dir, path, step=step, sampling=_sampling(cfg.generate, None, sampling),
            max_new_tokens=int(max_new_tokens or cfg.generate.max_new_tokens),
            batch_size=batch_size, seed=int(cfg.seed if seed is None else seed))
        return cls(backend, cfg, description)

    def caption(self, videos: PathLike | Sequence[PathLike], *, prompt: str | None = None,
                max_new_tokens: int | None = None, sample: int = 0, **sampling) -> str | list[str]:
        """One caption per video: a str for one path, a list of str (same order) for a list.
        `sampling` (greedy, temperature, top_p, top_k) overrides the default decoding for this
        call; `sample` picks the random draw (the CLI's sample index: the same seed, id and sample
        give the same caption). An unreadable file raises ValueError naming it and why."""
        from vsalmonn_jax.generate.caption_io import discover_items
        from vsalmonn_jax.generate.caption_run import caption_rows

        single = isinstance(videos, (str, os.PathLike))
        paths = [str(pathlib.Path(v)) for v in ([videos] if single else videos)]
        items = {}
        for path in dict.fromkeys(paths):
            own_track = self.config.data.get("video_audio", "track") == "record"
            found, errors = discover_items([path], own_track=own_track)
            if errors or len(found) != 1 or os.path.isdir(path):
                raise ValueError(f"{path}: not a video or audio file"
                                 + (f" ({'; '.join(errors)})" if errors else ""))
            items[path] = dict(found[0], **({"prompt": prompt} if prompt else {}))
        backend = self.backend
        saved = backend.sampling, backend.max_new_tokens
        backend.sampling = _sampling(self.config.generate, saved[0], sampling)
        backend.max_new_tokens = int(max_new_tokens or saved[1])

        def unreadable(item: dict, reason: str) -> None:
            raise ValueError(f"{item.get('video') or item.get('audio')}: cannot caption it: {reason}")

        captions = {}
        try:
            for batch in caption_rows([(item, sample) for item in items.values()], backend,
                                      unreadable):
                captions.update({item["id"]: result["caption"] for item, _, result in batch})
        finally:
            backend.sampling, backend.max_new_tokens = saved
        out = [captions[items[p]["id"]] for p in paths]
        return out[0] if single else out


def _sampling(generate_cfg, current, overrides: dict):
    """The SamplingConfig of `current` (else config.generate) with keyword overrides; giving
    temperature / top_p / top_k without greedy= turns sampling on (as the CLI flags do)."""
    from vsalmonn_jax.generate.sampling import SamplingConfig

    unknown = set(overrides) - {"greedy", "temperature", "top_p", "top_k"}
    if unknown:
        raise TypeError(f"unknown sampling argument(s) {sorted(unknown)}: use greedy, "
                        "temperature, top_p, top_k")
    base = current or SamplingConfig.from_config(generate_cfg)
    if "greedy" not in overrides and overrides:
        overrides = dict(overrides, greedy=False)
    return dataclasses.replace(base, **overrides)
