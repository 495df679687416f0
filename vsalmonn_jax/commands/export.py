"""`vsalmonn-jax export --checkpoint DIR --out DIR`: a trained checkpoint -> a directory that
`transformers` loads directly (`Qwen2ForCausalLM.from_pretrained(OUT)`), the AV parts beside it.

DIR may be a run workdir (`checkpoints/`; its config.json and tokenizer are read, so no --config is
needed), an mrDPO workdir (its final round state: `rounds/<R>`), an orbax checkpoint directory, or
one step of it, or a `vsalmonn-jax demo` run (its final model) or stage folder. Every checkpoint kind exports: LoRA SFT / align, DPO, mrDPO round, rebirth,
text-only. Output:
  OUT/config.json + OUT/model.safetensors   the LLM with LoRA merged (W + alpha/r A B), in
                                            Qwen2ForCausalLM naming (models/qwen2.py save_hf);
                                            + the run's tokenizer files
  OUT/av/connectors.safetensors             the trainable `adapter` collection (Q-Former, audio /
                                            vision projectors, image_newline), names = our tree
                                            paths joined by "." (e.g. audio_connector.final_linear...)
  OUT/av/encoders.safetensors               frozen non-LLM params (SigLIP, Whisper) when present
  OUT/av/config.json                        the run's config (shapes of every part)
  OUT/export.json                           manifest: source, step, LoRA scale, files, shapes
The frozen base comes from the checkpoint when it holds `params` (mrDPO always does; run_stage with
include_params), else it is rebuilt as the run built it (`--base init`, the default: the inference
loader, generate/model_load.py: config.model.pretrained when set, else re-initialised from
config.seed as a fresh run does, the tiny / demo models) or read from `--base HF_DIR` (a
transformers Qwen2 directory, text-only LLM).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys
from collections.abc import Mapping

import numpy as np

from vsalmonn_jax.generate.run_dir import tokenizer_files

EXPORT_DTYPES = ("float32", "bfloat16", "float16")
AV_DIR = "av"   # the AV parts beside the transformers LLM


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


def is_av(trainable: Mapping) -> bool:
    """Whether a checkpoint's trainables belong to the AV model (connectors, or LoRA under "llm")."""
    return bool(trainable.get("adapter")) or "llm" in (trainable.get("lora") or {})


def base_params(config, base: str, text_only: bool) -> dict:
    """The frozen base when the checkpoint lacks it: `init` rebuilds it as the run / inference does
    (generate/model_load.restore_for_inference without a checkpoint); else a transformers dir."""
    import jax

    if base == "init":
        from vsalmonn_jax.generate.model_load import restore_for_inference
        from vsalmonn_jax.models.pretrained import warn_if_random
        from vsalmonn_jax.training.sharding import make_mesh
        from vsalmonn_jax.training.task import build_task

        task = build_task(config, text_only=text_only)
        mesh = make_mesh({"data": 1}, devices=jax.devices()[:1])
        variables, info = restore_for_inference(config, task, mesh, None)
        warn_if_random(info["pretrained"], "export")
        return jax.tree.map(np.asarray, jax.device_get(variables["params"]))
    from vsalmonn_jax.models.qwen2 import load_hf

    params, _ = load_hf(base, param_dtype=str(config.model.llm.param_dtype))
    params = jax.tree.map(np.asarray, jax.device_get(params))
    return params if text_only else {"llm": params}


def split_llm(params: Mapping, lora: Mapping | None) -> tuple[dict, dict | None, dict]:
    """(LLM params, LLM LoRA, other frozen params): the AV layout nests the LLM under "llm"."""
    if "llm" in params:
        others = {k: v for k, v in params.items() if k != "llm"}
        return dict(params["llm"]), (None if lora is None else lora.get("llm")), others
    return dict(params), lora, {}


def flat_names(tree: Mapping) -> dict[str, np.ndarray]:
    from flax import traverse_util

    return {".".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(dict(tree)).items()}


def check_llm_shapes(llm: Mapping, lora: Mapping | None, llm_config, lora_config, where: str) -> None:
    """The checkpoint's LLM (and LoRA) shapes against the config's: a wrong preset is named here,
    shape by shape, instead of failing inside the merge or in transformers."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from vsalmonn_jax.generate.model_load import check_shapes
    from vsalmonn_jax.lora import init_lora
    from vsalmonn_jax.models.qwen2 import Qwen2

    def expected():
        params = nn.unbox(Qwen2(llm_config).init(jax.random.PRNGKey(0),
                                                 jnp.zeros((1, 1), jnp.int32))["params"])
        return {"llm": params, **({"lora": init_lora(jax.random.PRNGKey(1), params, lora_config)}
                                  if lora else {})}

    check_shapes({"llm": llm, **({"lora": lora} if lora else {})}, jax.eval_shape(expected), where)


def merged_llm(llm: Mapping, lora: Mapping, scale: float, dtype: str | None) -> dict:
    """W + scale * A @ B as host arrays: in the base's dtype (as the release's bf16 merge) unless the
    export asks for a wider one (--dtype float32 then holds the exact fp32 sum, not the
    bf16-rounded one upcast)."""
    import jax
    import jax.numpy as jnp

    from vsalmonn_jax.lora import merge

    def widen(x):
        x = np.asarray(x)
        floating = jnp.issubdtype(x.dtype, jnp.floating)   # bfloat16 included (numpy's is not)
        return x.astype(dtype) if dtype and floating and x.dtype.itemsize < np.dtype(dtype).itemsize else x

    return jax.tree.map(np.asarray, merge(jax.tree.map(widen, llm), lora, scale))


def export(state: Mapping, config, out: str | pathlib.Path, *, dtype: str | None = None,
           source: str = "", step: int = 0, base: str | None = "init") -> dict:
    """Write the merged export of a restored state tree; returns the manifest."""
    import jax.numpy as jnp

    from vsalmonn_jax.lora import LoraConfig
    from vsalmonn_jax.models.qwen2 import Qwen2Config, save_hf
    from vsalmonn_jax.safetensors_io import write_safetensors

    out = pathlib.Path(out)
    trainable = dict(state.get("trainable") or {})
    params = state.get("params")
    if params is None:
        from vsalmonn_jax.models.pretrained import given

        if base is None and given(config):
            base = "init"  # the base the run trained on: config.model.pretrained
        if base is None:
            raise ValueError(f"{source}: the checkpoint holds no frozen base `params`; set "
                             "--config.model.pretrained.llava=DIR (+ .whisper / .official) as the "
                             "run did, or pass --base init (rebuild it as the run did) or --base "
                             "HF_DIR (a transformers Qwen2 directory)")
        params = base_params(config, base, text_only=not is_av(trainable))
    lcfg = LoraConfig.from_config(config.model.lora)
    llm, lora, others = split_llm(params, trainable.get("lora"))
    llm_config = Qwen2Config.from_config(config.model.llm)
    check_llm_shapes(llm, lora, llm_config, lcfg, str(source))
    if lora:
        llm = merged_llm(llm, lora, lcfg.scale, dtype)
    save_hf(llm, llm_config, out, dtype=dtype)
    files = {"llm": "model.safetensors"}
    tokenizer = str(config.data.get("tokenizer", "") or "")
    if tokenizer and pathlib.Path(tokenizer).is_dir():
        for item in tokenizer_files(tokenizer):   # never the weights of a folder it was found in
            shutil.copy2(item, out / item.name)
        files["tokenizer"] = "./"
    cast = (lambda x: x.astype(np.dtype(dtype)) if dtype and jnp.issubdtype(x.dtype, jnp.floating)
            else x)
    meta = {"format": "vsalmonn_jax", "names": "flax tree paths joined by '.'"}
    (out / AV_DIR).mkdir(exist_ok=True)
    (out / AV_DIR / "config.json").write_text(config.to_json_best_effort(indent=1))
    files["config"] = f"{AV_DIR}/config.json"
    adapter = flat_names(trainable.get("adapter") or {})
    if adapter:
        write_safetensors(out / AV_DIR / "connectors.safetensors",
                          {k: cast(v) for k, v in adapter.items()}, meta)
        files["connectors"] = f"{AV_DIR}/connectors.safetensors"
    encoders = flat_names(others)
    if encoders:
        write_safetensors(out / AV_DIR / "encoders.safetensors",
                          {k: cast(v) for k, v in encoders.items()}, meta)
        files["encoders"] = f"{AV_DIR}/encoders.safetensors"
    manifest = {"source": str(source), "step": int(step), "lora_merged": bool(lora),
                "lora_scale": lcfg.scale if lora else None, "dtype": dtype or "as trained",
                "files": files, "base": "checkpoint" if "params" in state else base,
                "connectors": {k: list(v.shape) for k, v in adapter.items()},
                "encoders": sorted({k.split(".")[0] for k in encoders}),
                "llm_config": json.loads((out / "config.json").read_text(encoding="utf-8"))}
    (out / "export.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def demo_state(run_dir, config, checkpoint) -> tuple[dict | None, int]:
    """A `vsalmonn-jax demo` run (or stage): its final (or named) stage as a state tree, step 0;
    (None, 0) for anything else."""
    from vsalmonn_jax.demo.serve import export_state, is_demo_run

    if not is_demo_run(run_dir, config):
        return None, 0
    if not config.data.tokenizer:
        from vsalmonn_jax.demo.serve import data_dir

        config.data.tokenizer = str(data_dir(run_dir, config) / "tokenizer")
    state, stage = export_state(run_dir, config, checkpoint)
    print(f"export: demo run {run_dir}, stage {stage}", file=sys.stderr)
    return state, 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vsalmonn-jax export", description=__doc__,   # the whole text
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run / mrDPO workdir, checkpoint dir or step")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--base", default="init",
                   help="frozen base when the checkpoint has none: 'init' (rebuilt as the run "
                   "built it, the default) or a transformers Qwen2 HF_DIR")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer files to ship (default: the run's copy, else data.tokenizer)")
    p.add_argument("--dtype", default=None, choices=EXPORT_DTYPES,
                   help="tensor dtype of the export (default: as trained)")
    return p


def main(argv: list[str]) -> int:
    from vsalmonn_jax.config import split_config_args
    from vsalmonn_jax.generate.run_dir import resolve_config

    config_path, overrides, rest = split_config_args(argv)
    args = _parser().parse_args(rest)
    try:
        config, run_dir, source = resolve_config(args.checkpoint, config_path, overrides)
        if args.tokenizer:
            config.data.tokenizer = args.tokenizer
        from vsalmonn_jax.config_check import check_for_cli

        if check_for_cli("vsalmonn-jax export", config):
            return 2
        state, step = demo_state(run_dir, config, args.checkpoint)
        if state is None:
            state, _, step = read_checkpoint(args.checkpoint, args.step)
        manifest = export(state, config, args.out, dtype=args.dtype, source=args.checkpoint,
                          step=step, base=args.base)
    except (FileNotFoundError, ValueError, KeyError) as err:
        print(f"vsalmonn-jax export: {err}", file=sys.stderr)
        return 1
    print(f"exported step {step} of {args.checkpoint} (config {source}) to {args.out}: "
          f"{', '.join(manifest['files'].values())}; load the LLM with transformers' "
          f"Qwen2ForCausalLM.from_pretrained({args.out!r})")
    return 0
