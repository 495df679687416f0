"""Runs describe themselves: a run / stage / checkpoint folder -> the config it trained with (the
run's config.json) and its tokenizer (the copy `train` keeps in the run, else `data.tokenizer`).

Used by `caption`, `export` and the `Captioner` API so that `--checkpoint RUN` needs no `--config`
or `--tokenizer`; an explicit `--config` (a preset or any run's config.json) and `--config.a.b=v`
overrides still win.
"""

from __future__ import annotations

import json
import pathlib
import shutil

RUN_CONFIG = "config.json"
RUN_TOKENIZER = "tokenizer"
# what makes a Hugging Face tokenizer: copied from a tokenizer folder, nothing else (data.tokenizer
# may be a weights folder: its safetensors / config.json must never travel with the tokenizer)
TOKENIZER_NAMES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model",
                   "spiece.model", "chat_template.json", "chat_template.jinja")


def tokenizer_files(folder: str | pathlib.Path) -> list[pathlib.Path]:
    """The tokenizer files of `folder` (TOKENIZER_NAMES that exist)."""
    return [pathlib.Path(folder) / name for name in TOKENIZER_NAMES
            if (pathlib.Path(folder) / name).is_file()]
SEARCH_LEVELS = 4     # run/checkpoints/<step>/state: config.json is at most this many folders up


def is_run_config(path: pathlib.Path) -> bool:
    """A config.json that `train` / `demo` wrote (a `model.llm` section), not a transformers one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and isinstance(data.get("model"), dict) and "llm" in data["model"]


def find_run_dir(path: str | pathlib.Path) -> pathlib.Path | None:
    """The nearest folder at or above `path` (SEARCH_LEVELS up) holding a run's config.json."""
    here = pathlib.Path(path).absolute()
    for folder in [here, *here.parents][: SEARCH_LEVELS + 1]:
        if is_run_config(folder / RUN_CONFIG):
            return folder
    return None


def run_tokenizer(run_dir: pathlib.Path | None) -> str:
    """The tokenizer a run keeps: <run>/tokenizer (train's copy), else <run>/data/tokenizer (the
    demo's data set); "" when it has none."""
    if run_dir is None:
        return ""
    for folder in (run_dir / RUN_TOKENIZER, run_dir / "data" / RUN_TOKENIZER):
        if folder.is_dir() and any(folder.iterdir()):
            return str(folder)
    return ""


def resolve_config(checkpoint: str | pathlib.Path | None, config_path: str | None = None,
                   overrides: list[str] | tuple[str, ...] = ()):
    """(config, run dir or None, where the config came from) for a checkpoint.

    `config_path` given: that preset / config.json; else the run's config.json found at or above
    the checkpoint (a clear error when there is none). The run's tokenizer copy replaces
    `data.tokenizer` before the overrides apply, and fills it when a preset leaves it empty.
    No checkpoint (`caption` with `model.pretrained` weights alone): the preset, no run.
    """
    from vsalmonn_jax.config import apply_override, load_config

    run_dir = find_run_dir(checkpoint) if checkpoint is not None else None
    if checkpoint is None and not config_path:
        raise FileNotFoundError("no --checkpoint and no --config: pass a run (--checkpoint RUN) or "
                                "a preset with pretrained weights (--config configs/X.py "
                                "--config.model.pretrained.llava=DIR ...)")
    if config_path:
        config, source = load_config(config_path), str(config_path)
    elif run_dir is not None:
        source = str(run_dir / RUN_CONFIG)
        config = load_config(source)
    else:
        raise FileNotFoundError(
            f"{checkpoint}: no run config.json in it or in the {SEARCH_LEVELS} folders above (train "
            "writes one into its workdir); pass --config configs/X.py (the preset it trained with)")
    tokenizer = run_tokenizer(run_dir)
    if tokenizer and (not config_path or not config.data.tokenizer):
        config.data.tokenizer = tokenizer
    for override in overrides:
        apply_override(config, override)
    return config, run_dir, source


def save_tokenizer(config, workdir: str | pathlib.Path) -> str:
    """Copy the tokenizer files of `data.tokenizer` (a local folder: possibly the weights folder it
    was found in) into <workdir>/tokenizer once, so the run carries the tokenizer it trained with.
    Returns the copy's path ("" when there is no local tokenizer)."""
    source = pathlib.Path(str(config.data.get("tokenizer", "") or ""))
    target = pathlib.Path(workdir) / RUN_TOKENIZER
    if not str(source) or str(source) == "." or not source.is_dir():
        return ""
    if target.absolute() == source.absolute():
        return str(target)
    if not target.is_dir():
        tmp = target.with_name(RUN_TOKENIZER + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for path in tokenizer_files(source):
            shutil.copy2(path, tmp / path.name)
        tmp.replace(target)
    return str(target)
