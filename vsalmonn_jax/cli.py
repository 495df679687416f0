"""`vsalmonn-jax` command-line entry point: dispatches to `vsalmonn_jax.commands.<name>.main(argv)`.

Subcommands are imported lazily so `vsalmonn-jax --help` stays fast and one broken extra never blocks
the others.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": "Train a stage: --config configs/X.py --config.stage=align|sft|dpo|mrdpo|rebirth",
    "caption": "Caption videos, a folder or a JSONL of records with a checkpoint",
    "eval": "Score captions against ground-truth events (exact | embedding | llm judge)",
    "export": "Export merged weights as transformers-named safetensors",
    "demo": "Synthetic end-to-end run: data -> align -> SFT -> mrDPO -> rebirth -> report",
    "plan": "Per-device memory plan for a config on a mesh (AOT, no weights allocated)",
    "data": "Build the synthetic data set or validate JSONL records",
    "check-weights": "Check config.model.pretrained's checkpoints against the config (headers only)",
    "config": "Print the resolved config: config show --config configs/X.py --config.a.b=value",
}


def _usage() -> str:
    lines = ["usage: vsalmonn-jax COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<13} {text}" for name, text in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"vsalmonn-jax: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    from vsalmonn_jax import compile_cache

    try:
        compile_cache.enable()
    except ValueError as err:   # a bad $VSALMONN_JAX_CACHE_MAX_GB
        print(f"vsalmonn-jax: {err}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(f"vsalmonn_jax.commands.{name.replace('-', '_')}")
    except ModuleNotFoundError as err:
        if err.name == f"vsalmonn_jax.commands.{name.replace('-', '_')}":
            print(f"vsalmonn-jax: command {name!r} is not implemented yet", file=sys.stderr)
            return 2
        raise
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
