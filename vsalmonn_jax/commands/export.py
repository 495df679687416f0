"""`vsalmonn-jax export --checkpoint DIR --out DIR`: a trained checkpoint -> merged safetensors that
`transformers` (and this package's importers) read back.

DIR may be an mrDPO workdir (its final round state: `rounds/<R>`), a run workdir (`checkpoints/`),
an orbax checkpoint directory, or one step of it. Output:
  OUT/llm/model.safetensors + config.json   the LLM with LoRA merged (W + alpha/r A B), in
                                            Qwen2ForCausalLM naming (models/qwen2.py save_hf);
                                            + the tokenizer files when data.tokenizer is set
  OUT/connectors.safetensors                the trainable `adapter` collection (Q-Former, audio /
                                            vision projectors, image_newline), names = our tree
                                            paths joined by "." (e.g. audio_connector.final_linear...)
  OUT/encoders.safetensors                  frozen non-LLM params (SigLIP, Whisper) when present
  OUT/export.json                           manifest: source, step, LoRA scale, files, shapes
The frozen base comes from the checkpoint when it holds `params` (mrDPO always does; run_stage with
include_params), else from `--base HF_DIR` (a transformers Qwen2 directory, text-only LLM) or
`--base init` (re-initialised from config.seed, as a fresh run does: the tiny / demo models).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys
from collections.abc import Mapping

import numpy as np

EXPORT_DTYPES = ("float32", "bfloat16", "float16")


def resolve_checkpoint(path: str | pathlib.Path) -> tuple[pathlib.Path, int | None]:
    """(orbax manager directory, step or None = latest) for any accepted form of --checkpoint."""
    path = pathlib.Path(path).absolute()
    if not path.is_dir():
        raise FileNotFoundError(f"--checkpoint {path}: no such directory")
    if (path / "rounds").is_dir():      # mrDPO workdir: the final round-start state
        return path / "rounds", None
    if (path / "checkpoints").is_dir():
        return path / "checkpoints", None
    if path.name.isdigit() and (path / "state").is_dir():
        return path.parent, int(path.name)
    if any(p.name.isdigit() and (p / "state").is_dir() for p in path.iterdir()):
        return path, None
    raise FileNotFoundError(f"--checkpoint {path}: not an orbax checkpoint (no <step>/state), "
                            "run workdir (checkpoints/) or mrDPO workdir (rounds/)")


def read_checkpoint(path: str | pathlib.Path, step: int | None = None) -> tuple[dict, dict, int]:
    """(state tree as host numpy: params?, trainable, ..., meta JSON, step) of a checkpoint.

    The restore target is built from the checkpoint's own metadata (shapes, dtypes) on one device,
    so no config or optimizer is needed to read it.
    """
    import jax
    import orbax.checkpoint as ocp

    directory, wanted = resolve_checkpoint(path)
    manager = ocp.CheckpointManager(directory, item_names=("state", "meta"), item_handlers={
        "state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})
    try:
        steps = sorted(manager.all_steps())
        step = wanted if wanted is not None else (step if step is not None else manager.latest_step())
        if step is None or step not in steps:
            raise FileNotFoundError(f"{directory}: no checkpoint step {step} (steps: {steps})")
        metadata = manager.item_metadata(step)["state"]
        tree = metadata.tree if hasattr(metadata, "tree") else metadata
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device),
                              tree)
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    finally:
        manager.close()
    state = jax.tree.map(np.asarray, jax.device_get(dict(restored["state"])))
    return state, dict(restored["meta"] or {}), int(step)


def base_params(config, base: str) -> dict:
    """The frozen base when the checkpoint lacks it: a transformers dir (LLM) or `init` (seed)."""
    import jax

    from vsalmonn_jax.training import state as st
    from vsalmonn_jax.training.sharding import make_mesh
    from vsalmonn_jax.training.task import build_task

    if base == "init":
        task = build_task(config)
        tx, _ = st.make_optimizer(config.train, 1)
        mesh = make_mesh({"data": 1}, devices=jax.devices()[:1])
        state, _ = st.create_train_state(task, config, tx, mesh, jax.random.PRNGKey(int(config.seed)))
        return jax.tree.map(np.asarray, jax.device_get(state.params))
    from vsalmonn_jax.models.qwen2 import load_hf

    params, _ = load_hf(base, param_dtype=str(config.model.llm.param_dtype))
    return jax.tree.map(np.asarray, jax.device_get(params))


def split_llm(params: Mapping, lora: Mapping | None) -> tuple[dict, dict | None, dict]:
    """(LLM params, LLM LoRA, other frozen params): the AV layout nests the LLM under "llm"."""
    if "llm" in params:
        others = {k: v for k, v in params.items() if k != "llm"}
        return dict(params["llm"]), (None if lora is None else lora.get("llm")), others
    return dict(params), lora, {}


def flat_names(tree: Mapping) -> dict[str, np.ndarray]:
    from flax import traverse_util

    return {".".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(dict(tree)).items()}


def export(state: Mapping, config, out: str | pathlib.Path, *, dtype: str | None = None,
           source: str = "", step: int = 0, base: str | None = None) -> dict:
    """Write the merged export of a restored state tree; returns the manifest."""
    import jax

    from vsalmonn_jax.lora import LoraConfig, merge
    from vsalmonn_jax.models.qwen2 import Qwen2Config, save_hf
    from vsalmonn_jax.safetensors_io import write_safetensors

    out = pathlib.Path(out)
    trainable = dict(state.get("trainable") or {})
    params = state.get("params")
    if params is None:
        if base is None:
            raise ValueError(f"{source}: the checkpoint holds no frozen base `params`; pass --base "
                             "HF_DIR (a transformers Qwen2 directory) or --base init (re-initialise "
                             "from config.seed, as a fresh run does)")
        params = base_params(config, base)
    lcfg = LoraConfig.from_config(config.model.lora)
    llm, lora, others = split_llm(params, trainable.get("lora"))
    if lora:
        llm = jax.tree.map(np.asarray, merge(llm, lora, lcfg.scale))
    llm_config = Qwen2Config.from_config(config.model.llm)
    save_hf(llm, llm_config, out / "llm", dtype=dtype)
    files = {"llm": "llm/model.safetensors"}
    tokenizer = str(config.data.get("tokenizer", "") or "")
    if tokenizer and pathlib.Path(tokenizer).is_dir():
        for item in pathlib.Path(tokenizer).iterdir():
            if item.is_file():
                shutil.copy2(item, out / "llm" / item.name)
        files["tokenizer"] = "llm/"
    cast = (lambda x: x.astype(np.dtype(dtype)) if dtype and np.issubdtype(x.dtype, np.floating)
            else x)
    meta = {"format": "vsalmonn_jax", "names": "flax tree paths joined by '.'"}
    adapter = flat_names(trainable.get("adapter") or {})
    if adapter:
        write_safetensors(out / "connectors.safetensors", {k: cast(v) for k, v in adapter.items()},
                          meta)
        files["connectors"] = "connectors.safetensors"
    encoders = flat_names(others)
    if encoders:
        write_safetensors(out / "encoders.safetensors", {k: cast(v) for k, v in encoders.items()},
                          meta)
        files["encoders"] = "encoders.safetensors"
    manifest = {"source": str(source), "step": int(step), "lora_merged": bool(lora),
                "lora_scale": lcfg.scale if lora else None, "dtype": dtype or "as trained",
                "files": files, "base": "checkpoint" if "params" in state else base,
                "connectors": {k: list(v.shape) for k, v in adapter.items()},
                "encoders": sorted({k.split(".")[0] for k in encoders}),
                "llm_config": json.loads((out / "llm" / "config.json").read_text())}
    (out / "export.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vsalmonn-jax export", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="mrDPO / run workdir, checkpoint dir or step")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--base", default=None,
                   help="frozen base when the checkpoint has none: HF_DIR or 'init'")
    p.add_argument("--dtype", default=None, choices=EXPORT_DTYPES,
                   help="tensor dtype of the export (default: as trained)")
    return p


def main(argv: list[str]) -> int:
    from vsalmonn_jax.config import load_config, split_config_args

    config_path, overrides, rest = split_config_args(argv)
    args = _parser().parse_args(rest)
    if config_path is None:
        print("vsalmonn-jax export: --config PRESET is required (the shapes the checkpoint was "
              "trained with, e.g. --config configs/tiny.py)", file=sys.stderr)
        return 2
    config = load_config(config_path, overrides)
    from vsalmonn_jax.config_check import check_for_cli

    if check_for_cli("vsalmonn-jax export", config):
        return 2
    try:
        state, _, step = read_checkpoint(args.checkpoint, args.step)
        manifest = export(state, config, args.out, dtype=args.dtype, source=args.checkpoint,
                          step=step, base=args.base)
    except (FileNotFoundError, ValueError) as err:
        print(f"vsalmonn-jax export: {err}", file=sys.stderr)
        return 1
    print(f"exported step {step} of {args.checkpoint} to {args.out}: "
          f"{', '.join(manifest['files'].values())}")
    return 0
