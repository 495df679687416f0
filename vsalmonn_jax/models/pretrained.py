"""The pretrained-weights seam: `config.model.pretrained` (LLaVA-OneVision, Whisper, the official
release) -> the model's variables, streamed block by block onto the mesh, plus a record of what was read.

`load_pretrained_variables` is the one function every command reaches (through the train state's
initializer, training/state.py): each destination array is built with `jax.make_array_from_callback`
over memory-mapped tensors, so a process reads only the blocks its devices hold, in the model's dtype.
`plan_pretrained` is the same plan without the reading (check-weights, tests).
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import sys
from collections.abc import Mapping

from flax import traverse_util

SOURCES = ("llava", "whisper", "official")
PARTS = ("LLM", "vision", "projector", "image_newline", "Whisper", "Q-Former", "audio projections",
         "LoRA")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


def given(config) -> dict[str, str]:
    """The weight sources named in config.model.pretrained ({} when none: random init)."""
    section = config.model.get("pretrained") or {}
    return {k: str(section.get(k) or "") for k in SOURCES if section.get(k)}


def part_of(path: tuple[str, ...]) -> str:
    """Which user-facing part a variable path (collection, ...) belongs to."""
    collection, top = path[0], (path[1] if len(path) > 1 else "")
    if collection == "lora":
        return "LoRA"
    if collection == "adapter":
        if top == "vision_connector":
            return "image_newline" if path[-1] == "image_newline" else "projector"
        return "Q-Former" if len(path) > 2 and path[2] == "qformer" else "audio projections"
    return {"vision": "vision", "audio": "Whisper"}.get(top, "LLM")


def resolve_tokenizer(config) -> str:
    """Fill `data.tokenizer` when empty: model.pretrained.tokenizer, else a tokenizer found in the
    `official` directory, else in the `llava` one. Returns the value (may stay "")."""
    if not config.data.tokenizer:
        section = config.model.get("pretrained") or {}
        candidates = [section.get("tokenizer")] + [section.get(k) for k in ("official", "llava")]
        for candidate in filter(None, candidates):
            path = pathlib.Path(candidate)
            if path.is_dir() and any((path / f).is_file() for f in TOKENIZER_FILES):
                config.data.tokenizer = str(path)
                break
    return str(config.data.tokenizer)


def open_source(kind: str, path: str):
    """The stored tensors of one source (nothing read) -> (store, Source)."""
    from vsalmonn_jax.models.import_hf import Source
    from vsalmonn_jax.models.import_release import open_official
    from vsalmonn_jax.safetensors_io import CheckpointError, SafetensorsReader

    where = pathlib.Path(path)
    if not where.exists():
        raise CheckpointError(f"model.pretrained.{kind}={path}: no such file or directory")
    store = open_official(where) if kind == "official" else SafetensorsReader(where)
    return store, Source(store)


def layout_of(kind: str, keys) -> str:
    keys = list(keys)
    if kind == "whisper":
        return "transformers Whisper" + (" (+ decoder, ignored)" if any(".decoder." in k or
                                                                        k.startswith("decoder.")
                                                                        for k in keys) else "")
    if kind == "llava":
        if any(k.startswith("model.language_model.") or "multi_modal_projector" in k for k in keys):
            return "transformers LlavaOnevisionForConditionalGeneration"
        return "original LLaVA (model.layers, vision_tower.vision_tower, mm_projector)"
    prefixes = [p for p in ("module.", "base_model.model.") if any(p in k[:30] for k in keys)]
    lora = any(".lora_A." in k for k in keys)
    return "official video-SALMONN 2" + (f" under {' + '.join(prefixes)}" if prefixes else "") + \
        (" with PEFT LoRA (base_layer)" if lora else "")


def checksum(store) -> str:
    """sha256 of the names, dtypes and shapes (safetensors: the headers) — no tensor data read."""
    if hasattr(store, "header_digest"):
        return store.header_digest()
    digest = hashlib.sha256()
    for name in sorted(store.keys()):
        value = store[name]
        digest.update(json.dumps([name, str(value.dtype), list(value.shape)]).encode())
    return digest.hexdigest()


def _source_plan(kind: str, store, source, cfg, missing: list[str] | None) -> dict:
    from vsalmonn_jax.models import import_release

    if kind == "llava":
        return import_release.llava_plan(source, cfg, missing)
    if kind == "whisper":
        return import_release.whisper_model_plan(source, cfg, missing)
    return import_release.official_plan(store, cfg, missing)


def av_config(config):
    from vsalmonn_jax.models.av_llm import AVConfig

    return AVConfig.from_config(config, placeholder_id=0)


def plan_pretrained(config, *, collect_missing: bool = False) -> tuple[dict, dict]:
    """(flat plan {(collection, ...path): Lazy}, per-source info {kind: {path, layout, store,
    plan, missing}}): the sources in order llava, whisper, official (later wins). Nothing is read."""
    cfg = av_config(config)
    flat, sources = {}, {}
    for kind, path in given(config).items():
        store, source = open_source(kind, path)
        missing: list[str] | None = [] if collect_missing else None
        plan = traverse_util.flatten_dict(_source_plan(kind, store, source, cfg, missing))
        sources[kind] = {"path": str(pathlib.Path(path).absolute()), "layout": layout_of(kind, store.keys()),
                         "store": store, "plan": plan, "missing": missing or []}
        flat.update(plan)
    return flat, sources


def _text_only(flat: dict, abstract: Mapping) -> dict:
    """The text-only task's tree is Qwen2 at the root: keep the LLM (and its LoRA), un-nested."""
    if "llm" in abstract.get("params", {}):
        return flat
    return {(path[0], *path[2:]): lazy for path, lazy in flat.items()
            if len(path) > 2 and path[1] == "llm" and path[0] in ("params", "lora")}


def load_pretrained_variables(config, abstract: Mapping, shardings: Mapping | None = None,
                              collections=("params", "adapter", "lora")) -> tuple[dict, dict]:
    """THE seam: config.model.pretrained -> (variables {"params"?, "adapter"?, "lora"?} holding only
    the tensors the sources provide, as arrays placed with `shardings`; record).

    `abstract` / `shardings`: the model's variables as ShapeDtypeStructs / NamedShardings (same tree);
    only `collections` are filled (e.g. just "params" under a checkpoint's trainables). A tensor whose
    shape disagrees with the config raises CheckpointError naming the file's tensor and both shapes.
    The record (paths, layout, tensors read, header checksum, parts left to their init) is what a
    run writes next to its config.json. With no source configured -> ({}, {"base": "random ..."}).
    """
    import jax

    from vsalmonn_jax.safetensors_io import CheckpointError

    if not given(config):
        return {}, {"base": f"random (initialised from config.seed={config.seed}; set "
                            "model.pretrained.llava / .whisper / .official for real weights)"}
    flat, sources = plan_pretrained(config)
    flat = _text_only(flat, abstract)
    flat_abstract = traverse_util.flatten_dict(dict(abstract))
    flat_shardings = traverse_util.flatten_dict(dict(shardings)) if shardings is not None else {}
    out, unused = {}, []
    for path, lazy in flat.items():
        if path[0] not in collections:
            continue
        if path not in flat_abstract:
            unused.append("/".join(path))
            continue
        want = flat_abstract[path]
        if tuple(lazy.shape) != tuple(want.shape):
            raise CheckpointError(
                f"{lazy.source.stored_name(lazy.names[0])} ({'/'.join(path)}): shape {lazy.shape} in "
                f"the checkpoint, {tuple(want.shape)} in the config; set the config's model shapes to "
                "the checkpoint's (or use the matching preset)")
        sharding = flat_shardings.get(path) or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        out[path] = jax.make_array_from_callback(
            tuple(want.shape), sharding, lambda index, lazy=lazy, dtype=want.dtype: lazy.read(index, dtype))
    loaded_parts = {part_of(p) for p in out}
    wanted_parts = {part_of(p) for p in flat_abstract if p[0] in collections}
    record = {"base": "pretrained", "tensors": len(out),
              "lora_loaded": any(p[0] == "lora" for p in out),
              "fresh_parts": sorted(wanted_parts - loaded_parts),
              "sources": {kind: {"path": info["path"], "layout": info["layout"],
                                 "tensors": sum(len(v.names) for p, v in info["plan"].items()),
                                 "checksum": checksum(info["store"])}
                          for kind, info in sources.items()}}
    if unused:
        record["not_in_model"] = sorted(unused)[:20]
    return traverse_util.unflatten_dict(out), record


def describe(record: Mapping) -> str:
    """One line for logs: where the base came from."""
    if record.get("base") != "pretrained":
        return str(record.get("base"))
    parts = ", ".join(f"{k}={v['path']} ({v['layout']})" for k, v in record["sources"].items())
    fresh = record.get("fresh_parts") or []
    unused = record.get("not_in_model") or []
    return f"pretrained: {record['tensors']} arrays from {parts}" + \
        (f"; initialised from config.seed: {', '.join(fresh)}" if fresh else "") + \
        (f"; stored but not in this model (train.trainable / the preset): {', '.join(unused[:3])}"
         + (" ..." if len(unused) > 3 else "") if unused else "")


def write_record(workdir: str | pathlib.Path, record: Mapping) -> None:
    """Which weights the run started from: `run_records.pretrained` in the run's config.json
    (training/run_config.py), or `<workdir>/pretrained.json` for a workdir without one (a stage run
    from Python)."""
    import jax

    from vsalmonn_jax.training.run_config import add_record

    if record and jax.process_index() == 0:
        workdir = pathlib.Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        if (workdir / "config.json").exists():
            add_record(workdir, "pretrained", dict(record))
        else:
            (workdir / "pretrained.json").write_text(json.dumps(dict(record), indent=1))


def warn_if_random(record: Mapping, command: str) -> None:
    if record.get("base") != "pretrained":
        print(f"{command}: WARNING the frozen base is random: {record.get('base')}", file=sys.stderr)
