"""A run's `config.json`: written once at the first start, never overwritten with another config; a
resumed run is compared with it and refused on a change to anything that affects the trained weights.

Layout of `<workdir>/config.json`: the config's fields at the top level (what `caption` / `export`
read back) plus one reserved key, `RECORDS_KEY`, for facts about the run added later (`add_record`:
e.g. which pretrained weights were loaded, the config changes allowed at each resume).
With `--allow-config-change` a resume that changes guarded fields is recorded, not refused: its full
config goes to `config.resume-<n>.json` and `{resume, changes: {field: [saved, new]}}` to the records.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

from vsalmonn_jax.atomic_file import write_json
from vsalmonn_jax.defaults import LEGACY_VALUES

RECORDS_KEY = "run_records"
# fields that do not change the trained weights: logging / checkpoint cadence, where the run lives,
# how the data is fed (caches, quarantine file), the device mesh, how `caption` samples; a trailing
# ".*" = section.
# Not data.num_workers: the saved data position is per grain worker (pipeline.DataPositionError)
FREE_FIELDS = (
    "workdir", "mesh.*",
    "train.log_every", "train.eval_every", "train.checkpoint_every", "train.keep_checkpoints",
    "train.feature_cache",
    "data.root", "data.val", "data.test", "data.encoder_cache", "data.quarantine",
    "eval.cache_dir", "eval.llm_concurrency", "eval.embedding_threads",
    # caption-time decoding (training samples with mrdpo.*; rebirth captions greedily)
    "generate.greedy", "generate.temperature", "generate.top_p", "generate.top_k",
    "generate.decode_layout",
)


class ConfigChangedError(ValueError):
    """A resumed run's config differs from the saved one in fields that affect the trained weights."""


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1} (lists / tuples stay values)."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def is_free(field: str) -> bool:
    return any(field == f or (f.endswith(".*") and field.startswith(f[:-1])) for f in FREE_FIELDS)


def as_dict(config) -> dict:
    """A ConfigDict (or dict) as the JSON-able dict written to config.json."""
    text = config.to_json_best_effort() if hasattr(config, "to_json_best_effort") else json.dumps(config)
    return json.loads(text)


def config_changes(saved: dict, new: dict) -> dict[str, tuple[Any, Any]]:
    """{field: (saved, new)} for fields present in both whose values differ. A field the saved config
    lacks (added by a newer version of the code) is compared with its LEGACY_VALUES entry, the
    behaviour the run had; other such fields are not changes."""
    a, b = flatten({k: v for k, v in saved.items() if k != RECORDS_KEY}), flatten(new)
    a.update({k: json.loads(json.dumps(v)) for k, v in LEGACY_VALUES.items()   # () as saved: []
              if k not in a and k in b})
    return {k: (a[k], b[k]) for k in sorted(a.keys() & b.keys()) if a[k] != b[k]}


def read_run_config(workdir: str | os.PathLike) -> dict | None:
    """The saved config.json of a run (with its records), or None when the run has none."""
    path = pathlib.Path(workdir) / "config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err}); restore it or start a new --workdir") from None


def write_run_config(workdir: str | os.PathLike, config, *, allow_change: bool = False) -> dict:
    """First start: write `<workdir>/config.json`. Resume: compare with it; a change to a guarded
    field raises ConfigChangedError (the message lists each field, saved -> new) unless
    `allow_change`, which records the change (config.json keeps the original). Returns the changes
    ({field: [saved, new]}, free fields included) so callers can log them."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    new = as_dict(config)
    saved = read_run_config(workdir)
    if saved is None:
        write_json(workdir / "config.json", new, indent=2)
        return {}
    changes = config_changes(saved, new)
    guarded = {k: v for k, v in changes.items() if not is_free(k)}
    if guarded and not allow_change:
        lines = "\n  ".join(f"{k}: {v[0]!r} -> {v[1]!r}" for k, v in guarded.items())
        raise ConfigChangedError(
            f"{workdir} holds a run trained with another config; these changes affect the trained "
            f"weights:\n  {lines}\nResume with the saved settings, start a new --workdir, or pass "
            f"--allow-config-change to continue with the new ones (recorded in config.json).")
    if guarded:
        records = saved.setdefault(RECORDS_KEY, {})
        resumes = records.setdefault("config_changes", [])
        index = len(resumes) + 1
        write_json(workdir / f"config.resume-{index}.json", new, indent=2)
        resumes.append({"resume": index, "config": f"config.resume-{index}.json",
                        "changes": {k: list(v) for k, v in guarded.items()}})
        write_json(workdir / "config.json", saved, indent=2)
    return {k: list(v) for k, v in changes.items()}


def add_record(workdir: str | os.PathLike, key: str, value) -> None:
    """Record a fact about the run (JSON-able `value`) under config.json's RECORDS_KEY[key]; the
    config fields themselves are never changed. The run must have written its config.json."""
    path = pathlib.Path(workdir) / "config.json"
    saved = read_run_config(workdir)
    if saved is None:
        raise FileNotFoundError(f"{path} does not exist: write_run_config first")
    saved.setdefault(RECORDS_KEY, {})[key] = value
    write_json(path, saved, indent=2)
