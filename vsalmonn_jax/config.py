"""Loading `configs/*.py` presets or a run's saved `config.json` (ml_collections) and applying
`--config.a.b=value` overrides. The CLI and tests use `load_config`.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import pathlib

import ml_collections

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"


def resolve_config_path(name_or_path: str) -> pathlib.Path:
    """`tiny`, `configs/tiny.py` or any path to a preset file -> an existing path."""
    path = pathlib.Path(name_or_path)
    if path.is_file():
        return path
    candidate = CONFIG_DIR / (name_or_path if name_or_path.endswith(".py") else f"{name_or_path}.py")
    if candidate.is_file():
        return candidate
    raise FileNotFoundError(f"config {name_or_path!r} not found (looked at {path} and {candidate})")


def load_config(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> ml_collections.ConfigDict:
    """Load a preset (`configs/X.py`) or a run's `config.json`, then apply overrides written as
    `a.b=value` (or `--config.a.b=value`)."""
    path = resolve_config_path(name_or_path)
    if path.suffix == ".json":
        config = config_from_json(path)
    else:
        spec = importlib.util.spec_from_file_location(f"vsalmonn_config_{path.stem}", path)
        if spec is None or spec.loader is None:
            raise ValueError(f"config {path}: not a preset (.py with get_config()) or a run's "
                             "config.json")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config = module.get_config()
    for override in overrides:
        apply_override(config, override)
    return config


def config_from_json(path: str | pathlib.Path) -> ml_collections.ConfigDict:
    """A run's saved config.json (train / demo write it) -> the config it ran with: the JSON laid
    over `base_config()` so field types survive (lists back to tuples); sections the defaults lack
    (e.g. `demo`) are taken as they are."""
    from vsalmonn_jax.defaults import base_config

    path = pathlib.Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"config {path}: cannot read it as JSON ({err})") from err
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise ValueError(f"config {path}: not a run's config.json (no `model` section; a "
                         "transformers config.json describes an exported LLM, not a run)")
    from vsalmonn_jax.training.run_config import RECORDS_KEY

    data.pop(RECORDS_KEY, None)   # facts about the run (what was loaded, resumes), not settings
    config = base_config()
    _overlay(config, data)
    return config


def _overlay(node: ml_collections.ConfigDict, data: dict) -> None:
    for key, value in data.items():
        current = node.get(key) if key in node else None
        if isinstance(current, ml_collections.ConfigDict) and isinstance(value, dict):
            _overlay(current, value)
        elif key not in node:
            node[key] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value
        elif isinstance(current, tuple) and isinstance(value, list):
            node[key] = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        else:
            node[key] = value


def _parse_value(text: str, current):
    if isinstance(current, bool):
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise ValueError(f"expected a boolean, got {text!r}")
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    if isinstance(current, tuple) and isinstance(value, list):
        return tuple(value)
    if isinstance(current, tuple) and not isinstance(value, tuple):
        return (value,)
    return value


def apply_override(config: ml_collections.ConfigDict, override: str) -> None:
    """Apply one `a.b=value` (or `--config.a.b=value`) to `config` in place, keeping field types."""
    key, sep, text = override.removeprefix("--").removeprefix("config.").partition("=")
    if not sep:
        raise ValueError(f"config override {override!r} must look like a.b=value")
    *parents, leaf = key.split(".")
    node = config
    for name in parents:
        if name not in node:
            raise KeyError(f"config override {override!r}: no section {name!r}")
        node = node[name]
    if leaf not in node:
        raise KeyError(f"config override {override!r}: no field {leaf!r} in {'.'.join(parents) or 'config'}"
                       f" (fields: {', '.join(sorted(node.keys()))})")
    node[leaf] = _parse_value(text, node[leaf])


def split_config_args(argv: list[str]) -> tuple[str | None, list[str], list[str]]:
    """Split argv into (config path, config overrides, remaining args) for subcommands."""
    config_path, overrides, rest = None, [], []
    it = iter(argv)
    for arg in it:
        if arg == "--config":
            config_path = next(it, None)
        elif arg.startswith("--config="):
            config_path = arg.split("=", 1)[1]
        elif arg.startswith("--config."):
            if "=" not in arg:
                arg = f"{arg}={next(it, '')}"
            overrides.append(arg)
        else:
            rest.append(arg)
    return config_path, overrides, rest
