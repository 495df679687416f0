"""Loading `configs/*.py` presets (ml_collections) and applying `--config.a.b=value` overrides.

The CLI and tests use `load_config`; presets are plain files with a `get_config()` function.
"""

from __future__ import annotations

import ast
import importlib.util
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
    """Load a preset and apply overrides written as `a.b=value` (or `--config.a.b=value`)."""
    path = resolve_config_path(name_or_path)
    spec = importlib.util.spec_from_file_location(f"vsalmonn_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for override in overrides:
        apply_override(config, override)
    return config


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
