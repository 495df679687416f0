"""Whole released checkpoints as plans over import_hf's name maps: a LLaVA-OneVision directory, a
Whisper directory, and the official video-SALMONN 2 release (DeepSpeed / PEFT names, LAVIS Q-Former).

Each `*_plan` returns a variables-shaped tree of `Lazy` leaves (nothing read); `load_*` materialise
it on the host (tests, bench). Commands stream the plans onto the mesh (models/pretrained.py).
"""

from __future__ import annotations

import pathlib
import sys
from collections.abc import Mapping

import numpy as np
from flax import traverse_util

from vsalmonn_jax.models.import_hf import (
    Source,
    lin,
    linear,
    ln,
    materialize,
    plan_tree,
    qformer_entries,
    qwen2_plan,
    siglip_plan,
    squeeze0,
    vision_connector_plan,
    whisper_plan,
)


def cast(tree: Mapping, dtype) -> dict:
    import jax.numpy as jnp

    return {k: (cast(v, dtype) if isinstance(v, Mapping) else jnp.asarray(v, dtype))
            for k, v in tree.items()}


# ------------------------------------------------------------- LLaVA-OneVision / Whisper dirs ----

def llava_plan(source: Source, cfg, missing: list[str] | None = None) -> dict:
    """LLaVA-OneVision (transformers or LLaVA-NeXT naming): {"params": {vision, llm},
    "adapter": {vision_connector}}; `cfg` is an AVConfig."""
    return {"params": {"vision": siglip_plan(source, cfg.vision, missing),
                       "llm": qwen2_plan(source, cfg.llm, missing)},
            "adapter": {"vision_connector": vision_connector_plan(source, missing)}}


def whisper_model_plan(source: Source, cfg, missing: list[str] | None = None) -> dict:
    """A Whisper checkpoint (WhisperModel / WhisperForConditionalGeneration): {"params": {"audio":
    {"whisper"}}}. ln_speech is not part of Whisper: the official code creates it fresh (identity,
    the model's own init) and freezes it; trained values come with the official file."""
    return {"params": {"audio": {"whisper": whisper_plan(source, cfg.audio, missing)}}}


def _host(plan: Mapping, cfg) -> dict:
    dtypes = {"vision": cfg.vision.param_dtype, "llm": cfg.llm.param_dtype,
              "audio": cfg.audio.param_dtype}
    out: dict = {}
    for collection, parts in plan.items():
        out[collection] = {name: cast(materialize(tree), dtypes.get(name, "float32")
                                      if collection == "params" else "float32")
                           for name, tree in parts.items()}
    return out


def load_llava_onevision(source: Source | str | pathlib.Path, cfg) -> dict:
    """LLaVA-OneVision -> host variables {"params": {vision, llm}, "adapter": {vision_connector}}."""
    return _host(llava_plan(source if isinstance(source, Source) else Source(source), cfg), cfg)


def load_whisper(source: Source | str | pathlib.Path, cfg) -> dict:
    """Whisper -> host {"params": {"audio": {"whisper", "ln_speech" (identity)}}}."""
    out = _host(whisper_model_plan(source if isinstance(source, Source) else Source(source), cfg),
                cfg)
    d = cfg.audio.d_model
    out["params"]["audio"]["ln_speech"] = cast(
        {"scale": np.ones(d, np.float32), "bias": np.zeros(d, np.float32)}, cfg.audio.param_dtype)
    return out


def merge_variables(*parts: Mapping) -> dict:
    """Deep-merge variable dicts (later parts win), e.g. LLaVA-OV + Whisper + the official file."""
    out: dict = {}
    for part in parts:
        for key, value in part.items():
            if isinstance(value, Mapping) and isinstance(out.get(key), dict):
                out[key] = merge_variables(out[key], value)
            else:
                out[key] = dict(value) if isinstance(value, Mapping) else value
    return out


# ------------------------------------------------------------------- the official release ----

OFFICIAL_PREFIXES = ("module.", "base_model.model.")


def open_official(path: str | pathlib.Path) -> Mapping[str, object]:
    """The official release's tensors, nothing read: a safetensors file / directory (memory-mapped)
    or torch `.bin` files (`torch.load(mmap=True, weights_only=True)`)."""
    from vsalmonn_jax.safetensors_io import CheckpointError, SafetensorsReader

    path = pathlib.Path(path)
    if path.is_dir() and any(path.glob("*.safetensors")):
        return SafetensorsReader(path)
    if path.suffix == ".safetensors":
        return SafetensorsReader(path)
    files = release_bin_files(path)
    import torch

    state: dict = {}
    for file in files:
        try:
            state.update(torch.load(str(file), map_location="cpu", mmap=True, weights_only=True))
        except Exception as err:  # noqa: BLE001 - torch raises many kinds; name the file
            raise CheckpointError(f"{file}: not a torch state dict readable with weights_only=True "
                                  f"({type(err).__name__}: {err})") from err
    return state


def release_bin_files(path: pathlib.Path) -> list[pathlib.Path]:
    """The torch files to load, in order, as the release does (llava/model/utils.py): a
    `checkpoint-N.bin` holds the trained tensors only, so `all_parameters.bin` beside it comes
    first; a folder with several `checkpoint-*.bin` is ambiguous (the newest is not the last name):
    an error naming them; any other folder of `.bin` files (shards) loads whole."""
    from vsalmonn_jax.safetensors_io import CheckpointError

    if path.is_dir():
        steps = sorted(path.glob("checkpoint-*.bin"))
        if len(steps) > 1:
            raise CheckpointError(
                f"{path}: holds {len(steps)} release checkpoints ({', '.join(p.name for p in steps)}): "
                "set model.pretrained.official to the file of the step you want (its "
                "all_parameters.bin is loaded first, as the release does)")
        files = steps or sorted(path.glob("*.bin"))
        path = steps[0] if steps else path
    else:
        files = [path]
    if not files or not all(f.is_file() for f in files):
        raise CheckpointError(f"{path}: no *.safetensors or *.bin weights (model.pretrained.official)")
    if path.name.startswith("checkpoint-"):
        full = path.parent / "all_parameters.bin"
        if full.is_file():
            return [full, path]
        print(f"official weights: {path} holds the trained tensors only and no all_parameters.bin "
              "is beside it (the release loads that first): the rest comes from "
              "model.pretrained.llava / .whisper", file=sys.stderr)
    return files


def official_view(state: Mapping[str, object]) -> tuple[Source, Source]:
    """Normalise an official video-SALMONN 2 state dict (all_parameters.bin / checkpoint-N.bin):
    strip DeepSpeed `module.` and PEFT `base_model.model.` prefixes and `.base_layer`; the PEFT LoRA
    tensors (`<module>.lora_A.default.weight`) go to a second view keyed `<module>.A` / `.B`.
    Nothing is read: both views alias the stored names."""
    base, lora = {}, {}
    for stored in state.keys():
        name = stored
        for prefix in OFFICIAL_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
        name = name.replace(".base_layer.", ".")
        if ".lora_A." in name or ".lora_B." in name:
            module, _, rest = name.partition(".lora_")
            lora[f"{module}.{rest[0]}"] = stored
        else:
            base[name] = stored
    return Source(state, alias=base), Source(state, alias=lora)


def official_lora_plan(lora: Source, llm_cfg, missing: list[str] | None = None) -> dict:
    """PEFT lora_A [r, in] / lora_B [out, r] per layer -> {"llm": ...{"q_proj": {"a": [in, r],
    "b": [r, out]}}} stacked over layers (scan layout) or per `layers_{i}`."""
    suffix = "layers.0.self_attn.q_proj.A"
    prefix = next((k[: -len(suffix)] for k in lora.keys() if k.endswith(suffix)), None)
    if prefix is None:
        return {}
    entries, layer_entries = [], []
    for proj in ("q_proj", "k_proj", "v_proj"):
        if f"{prefix}layers.0.self_attn.{proj}.A" not in lora:
            continue
        for ours, theirs in (("a", "A"), ("b", "B")):
            name = f"{prefix}layers.{{i}}.self_attn.{proj}.{theirs}"
            if llm_cfg.scan_layers:
                layer_entries.append((f"self_attn/{proj}/{ours}", name, linear))
            else:
                entries += [(f"layers_{i}/self_attn/{proj}/{ours}", name.format(i=i), linear)
                            for i in range(llm_cfg.num_layers)]
    return {"llm": plan_tree(lora, entries, llm_cfg.num_layers, layer_entries, missing=missing)}


def official_plan(state: Mapping[str, object], cfg, missing: list[str] | None = None) -> dict:
    """The parts the official file holds, as a plan {"params": {vision?, llm?, audio?}, "adapter":
    {vision_connector?, audio_connector?}, "lora": {llm}?}; absent parts are left out (the file may
    hold only the trainables), so it merges over the LLaVA-OneVision + Whisper plans.

    Names (llava/model/language_model/video_salmonn_2.py): model.vision_tower.vision_tower.
    vision_model.*, model.mm_projector.{0,2}, model.image_newline, model.embed_tokens / layers / norm,
    lm_head, speech_encoder.* (Whisper encoder), ln_speech, speech_Qformer.bert.* (LAVIS BERT names),
    speech_query_tokens [1, Q, 768], speech_llama_proj, final_linear.{0,2}.
    """
    source, lora = official_view(state)
    params, adapter = {}, {}
    if source.has("embeddings.patch_embedding.weight"):
        params["vision"] = siglip_plan(source, cfg.vision, missing)
    if source.has("embed_tokens.weight"):
        params["llm"] = qwen2_plan(source, cfg.llm, missing)
    if source.has("conv1.weight"):
        params["audio"] = {"whisper": whisper_plan(source, cfg.audio, missing)}
        if source.has("ln_speech.weight"):
            params["audio"].update(plan_tree(source.sub(source.find_prefix("ln_speech.weight")),
                                             ln("ln_speech", "ln_speech"), missing=missing))
        elif missing is not None:
            missing.append("ln_speech.weight")
    if source.has("mm_projector.0.weight") or source.has("multi_modal_projector.linear_1.weight"):
        adapter["vision_connector"] = vision_connector_plan(source, missing)
    if source.has("speech_Qformer.bert.embeddings.LayerNorm.weight"):
        q = cfg.qformer
        base = source.find_prefix("speech_Qformer.bert.embeddings.LayerNorm.weight")
        connector = {"qformer": plan_tree(source.sub(base + "speech_Qformer.bert."), qformer_entries(
            q.num_layers, q.cross_attention_freq, "lavis"), missing=missing)}
        connector.update(plan_tree(source.sub(base), [
            ("query", "speech_query_tokens", squeeze0), *lin("audio_proj", "speech_llama_proj"),
            *(lin("final_linear_0", "final_linear.0") + lin("final_linear_1", "final_linear.2")
              if q.use_final_linear else [])], missing=missing))
        adapter["audio_connector"] = connector
    out = {k: v for k, v in (("params", params), ("adapter", adapter)) if v}
    lora_tree = official_lora_plan(lora, cfg.llm, missing)
    if lora_tree:
        out["lora"] = lora_tree
    return out


def official_lora(lora: Mapping[str, object] | Source, llm_cfg) -> dict:
    """Host LoRA tree of an official file's `<module>.A` / `.B` tensors ({} when it has none)."""
    plan = official_lora_plan(lora if isinstance(lora, Source) else Source(lora), llm_cfg)
    return cast(materialize(plan), "float32") if plan else {}


def load_official(state: Mapping[str, object] | str | pathlib.Path, cfg) -> dict:
    """The official release (a state dict, or a path: file / directory, `.bin` or safetensors) ->
    host variables of the parts it contains (see `official_plan`)."""
    if isinstance(state, (str, pathlib.Path)):
        state = open_official(state)
    return _host(official_plan(state, cfg), cfg)


def load_pretrained(cfg, rng, *, llava=None, whisper=None, official=None, lora=None) -> dict:
    """Host starting variables of the real recipe (tests, bench): SigLIP + projector + image_newline +
    Qwen2 from a LLaVA-OneVision directory, the Whisper encoder from a Whisper directory, then the
    official release's file on top; connectors missing from the files start fresh (seeded), and a
    fresh LoRA (B = 0) is made when `lora` is given and the files have none. Every leaf is checked
    against the model's shapes; anything missing is named. Leaves are plain (unboxed) arrays."""
    import flax.linen as nn
    import jax

    from vsalmonn_jax.lora import init_lora
    from vsalmonn_jax.models.av_llm import init_adapter, init_variables

    k_adapter, k_lora = jax.random.split(rng)
    parts = [{"adapter": init_adapter(k_adapter, cfg)}]
    if llava is not None:
        parts.append(load_llava_onevision(llava, cfg))
    if whisper is not None:
        parts.append(load_whisper(whisper, cfg))
    if official is not None:
        parts.append(load_official(official, cfg))
    variables = nn.unbox(merge_variables(*parts))
    if lora is not None and "lora" not in variables:
        variables["lora"] = {"llm": init_lora(k_lora, variables["params"]["llm"], lora)}
    expected = nn.unbox(jax.eval_shape(lambda: init_variables(jax.random.PRNGKey(0), cfg, lora)))
    flat_expected = traverse_util.flatten_dict(expected, sep="/")
    flat_got = traverse_util.flatten_dict(variables, sep="/")
    missing = sorted(set(flat_expected) - set(flat_got))
    if missing:
        raise KeyError(f"pretrained variables lack {len(missing)} tensors, e.g. {missing[:5]} "
                       "(pass llava= / whisper= / official=)")
    wrong = [f"{k}: {tuple(flat_got[k].shape)} != {tuple(v.shape)}" for k, v in flat_expected.items()
             if tuple(flat_got[k].shape) != tuple(v.shape)]
    if wrong:
        raise ValueError("checkpoint shapes do not match the config: " + "; ".join(wrong[:5]))
    return variables
