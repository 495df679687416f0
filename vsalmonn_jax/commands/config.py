"""`vsalmonn-jax config show`: print the resolved config of a preset plus `--config.a.b=value` overrides.

  vsalmonn-jax config show [--config configs/X.py] [--config.a.b=value ...] [--json]
One `a.b.c = value` line per field (values in JSON), or the whole tree as JSON with --json. Without --config: the defaults (vsalmonn_jax/defaults.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator, Mapping


def flat_fields(tree: Mapping, prefix: str = "") -> Iterator[tuple[str, object]]:
    """(dotted name, value) of every leaf, in the config's own order."""
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from flat_fields(value, name + ".")
        else:
            yield name, value


def _json(value) -> str:
    return json.dumps(list(value) if isinstance(value, tuple) else value, default=str)


def main(argv: list[str]) -> int:
    from vsalmonn_jax.config import apply_override, load_config, split_config_args
    from vsalmonn_jax.defaults import base_config

    config_path, overrides, rest = split_config_args(list(argv))
    parser = argparse.ArgumentParser(prog="vsalmonn-jax config", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="action", required=True)
    show = sub.add_parser("show", help="print the resolved config (preset + overrides)")
    show.add_argument("--json", action="store_true", help="the nested tree as JSON")
    args = parser.parse_args(rest)
    try:
        if config_path:
            config = load_config(config_path, overrides)
        else:
            config = base_config()
            for override in overrides:
                apply_override(config, override)
    except (ValueError, KeyError, FileNotFoundError) as err:
        print(f"vsalmonn-jax config: error: {err.args[0] if err.args else err}", file=sys.stderr)
        return 2
    if args.json:
        text = config.to_json_best_effort(indent=2, sort_keys=False)
    else:
        text = "\n".join(f"{name} = {_json(value)}" for name, value in flat_fields(config.to_dict()))
    try:
        print(text, flush=True)
    except BrokenPipeError:              # `config show | head`: the reader left, not an error
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (no flush error at exit)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
