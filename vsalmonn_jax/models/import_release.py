"""Whole released checkpoints as plans over import_hf's name maps: a LLaVA-OneVision directory, a
Whisper directory, and the official video-SALMONN 2 release (DeepSpeed / PEFT names, LAVIS Q-Former).

Each `*_plan` returns a variables-shaped tree of `Lazy` leaves (nothing read); `load_*` materialise
it on the host (tests, bench). Commands stream the plans onto the mesh (models/pretrained.py).
"""

from __future__ import annotations

import pathlib
import re
import sys
from collections import Counter
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
        ignored = sorted(p.name for p in path.glob("*.bin"))
        if ignored:
            print(f"official weights: {path} holds *.safetensors, so its {', '.join(ignored)} "
                  "are ignored (point model.pretrained.official at a .bin file to use it)",
                  file=sys.stderr)
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


def official_name(stored: str) -> tuple[str, bool]:
    """(normalised name, is a PEFT LoRA tensor) of an official stored name: DeepSpeed `module.` and
    PEFT `base_model.model.` stripped, `.base_layer` dropped, `<module>.lora_A.default.weight` ->
    `<module>.A` (`.B`)."""
    name = stored
    for prefix in OFFICIAL_PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix):]
    name = name.replace(".base_layer.", ".")
    if ".lora_A." in name or ".lora_B." in name:
        module, _, rest = name.partition(".lora_")
        return f"{module}.{rest[0]}", True
    return name, False


def official_view(state: Mapping[str, object]) -> tuple[Source, Source]:
    """Normalise an official video-SALMONN 2 state dict (all_parameters.bin / checkpoint-N.bin) by
    `official_name`: the base tensors, and the PEFT LoRA tensors in a second view keyed
    `<module>.A` / `.B`. Nothing is read: both views alias the stored names."""
    base, lora = {}, {}
    for stored in state.keys():
        name, is_lora = official_name(stored)
        (lora if is_lora else base)[name] = stored
    return Source(state, alias=base), Source(state, alias=lora)


# The official file's parts by the name words that mark them (normalised names): a part is present
# when ANY tensor carries one of its words, and is then planned whole (a missing tensor is named).
OFFICIAL_PARTS = {
    "Q-Former": ("speech_Qformer",),
    "audio projections": ("speech_query_tokens", "speech_llama_proj", "final_linear"),
    "Whisper": ("speech_encoder", "ln_speech"),
    "vision connector": ("mm_projector", "multi_modal_projector", "image_newline"),
    "vision": ("vision_tower", "vision_model"),
}
_LLM_NAME = re.compile(r"(^|\.)(embed_tokens|lm_head|norm)\.|(^|\.)layers\.\d+\.")
_LORA_KERNELS = r"self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj"   # the LLM layer's kernels


# Tensors of a present part the model leaves unread by design: the LAVIS Q-Former's text branch
# (SALMONN sets it to None; there when saved from a whole BERT). SigLIP's tail (layers past
# used_layers, post_layernorm, head) is unread too: see `dropped_part`.
_UNREAD = re.compile(r"speech_Qformer\.(cls\.|bert\.embeddings\.(word_embeddings|position_embeddings|"
                     r"position_ids)|bert\.encoder\.layer\.\d+\.(intermediate|output)\.)")


def dropped_part(stored: str) -> str | None:
    """The part an official stored tensor that no plan reads belongs to, when leaving it unread
    loses trained weights (check-weights calls that a problem); None: no part, or unread by design."""
    name, is_lora = official_name(stored)
    if is_lora:
        return "LoRA"
    part = official_part(name)
    return None if part in (None, "vision") or _UNREAD.search(name) else part


def official_part(name: str) -> str | None:
    """The model part a normalised official name belongs to ("LLM" for the Qwen2 names); None for
    a name of no part (e.g. a buffer)."""
    words = set(name.split("."))
    for part, markers in OFFICIAL_PARTS.items():
        if words & set(markers):
            return part
    return "LLM" if _LLM_NAME.search(name) and not name.endswith("rotary_emb.inv_freq") else None


def _root(names, markers, last: bool = False, default: str = "") -> str:
    """The most common prefix of `names` before the first (last: through the last) of `markers`'
    words; ties: the shortest. `default` when no name has one."""
    cuts = []
    for name in names:
        words = name.split(".")
        hits = [i for i, w in enumerate(words) if w in markers]
        if hits:
            cuts.append("".join(w + "." for w in words[:hits[-1] + 1 if last else hits[0]]))
    counts = Counter(cuts)
    return min(counts, key=lambda c: (-counts[c], len(c), c)) if counts else default


def _llm_prefix(names) -> str:
    """Where the LLM lives: before `embed_tokens`, else before `layers` / `norm`, else `model.`."""
    return _root(names, ("embed_tokens",)) or _root(names, ("layers", "norm"), default="model.")


def official_lora_plan(lora: Source, llm_cfg, missing: list[str] | None = None,
                       prefix: str | None = None) -> dict:
    """PEFT lora_A [r, in] / lora_B [out, r] of the LLM's layers (under `prefix`, else where the LoRA
    names say) -> {"llm": ...{"q_proj": {"a": [in, r], "b": [r, out]}}} stacked over layers (scan
    layout) or per `layers_{i}`; every adapted kernel found in some layer is planned for all layers.
    LoRA tensors elsewhere (vision tower, Whisper, ...) the model has no place for: CheckpointError
    (with `missing`, check-weights: left unplanned, so it reports them as unused)."""
    from vsalmonn_jax.safetensors_io import CheckpointError

    names = sorted(lora.keys())
    if prefix is None:
        llm = [n for n in names if official_part(n) == "LLM"]
        found = sorted({_root([n], ("layers",)) for n in llm if ".layers." in f".{n}"})
        if len(found) > 1:
            raise CheckpointError(f"official LoRA: the LLM's layers under several prefixes {found}")
        prefix = found[0] if found else "model."
    pattern = re.compile(rf"{re.escape(prefix)}layers\.(\d+)\.({_LORA_KERNELS})\.[AB]")
    matches = {n: pattern.fullmatch(n) for n in names}
    outside = [n for n, m in matches.items() if m is None or int(m.group(1)) >= llm_cfg.num_layers]
    if outside and missing is None and not any(   # every B all zeros (reads those only)
            np.any(np.asarray(lora[n], np.float32)) for n in outside if n.endswith(".B")):
        # the release's audio-visual LoRA wraps SigLIP's q/k/v too (train.py's hasattr(model,
        # "vision_tower") misses the tower), which never trains (frozen, no_grad): B = 0, no delta
        print(f"official weights: {len(outside)} LoRA tensors outside the LLM (e.g. "
              f"{lora.stored_name(outside[0])}) have B = 0, adding nothing: not imported",
              file=sys.stderr)
        outside = []
    if outside and missing is None:
        raise CheckpointError(
            f"official weights: {len(outside)} LoRA tensor(s) outside the LLM's {llm_cfg.num_layers} "
            f"layers under {prefix!r}, e.g. {', '.join(lora.stored_name(n) for n in outside[:3])}: "
            "this model adapts only the LLM's kernels, so they would be dropped (check "
            "model.llm.num_layers; merge other adapters into their base before importing)")
    entries, layer_entries = [], []
    for kind in sorted({m.group(2) for m in matches.values() if m is not None}):
        ours_module = kind.replace(".", "/")
        for ours, theirs in (("a", "A"), ("b", "B")):
            name = f"{prefix}layers.{{i}}.{kind}.{theirs}"
            if llm_cfg.scan_layers:
                layer_entries.append((f"{ours_module}/{ours}", name, linear))
            else:
                entries += [(f"layers_{i}/{ours_module}/{ours}", name.format(i=i), linear)
                            for i in range(llm_cfg.num_layers)]
    if not entries and not layer_entries:
        return {}
    return {"llm": plan_tree(lora, entries, llm_cfg.num_layers, layer_entries, missing=missing)}


def _part_plan(where: str, part: str, names: list[str], plan, missing: list[str] | None) -> dict:
    """`plan()` of a part the file holds; a tensor of it that is absent -> KeyError naming the file,
    the part and the tensor (with `missing`: collected there by the plan instead)."""
    try:
        return plan()
    except KeyError as err:
        raise KeyError(f"{where}: {err.args[0]}, though it holds the {part} ({len(names)} tensors, "
                       f"e.g. {names[0]}): a partial or mismatched checkpoint (check-weights lists "
                       "every missing tensor)") from err


def official_plan(state: Mapping[str, object], cfg, missing: list[str] | None = None) -> dict:
    """The parts the official file holds, as a plan {"params": {vision?, llm?, audio?}, "adapter":
    {vision_connector?, audio_connector?}, "lora": {llm}?}; absent parts are left out (the file may
    hold only the trainables), so it merges over the LLaVA-OneVision + Whisper plans. A part is
    present when any of its tensors is (`OFFICIAL_PARTS`) and is then planned whole.

    Names (llava/model/language_model/video_salmonn_2.py): model.vision_tower.vision_tower.
    vision_model.*, model.mm_projector.{0,2}, model.image_newline, model.embed_tokens / layers / norm,
    lm_head, speech_encoder.* (Whisper encoder), ln_speech, speech_Qformer.bert.* (LAVIS BERT names),
    speech_query_tokens [1, Q, 768], speech_llama_proj, final_linear.{0,2}.
    """
    source, lora = official_view(state)
    where = str(getattr(state, "path", "the official weights"))
    parts: dict[str, list[str]] = {}
    for name in sorted(source.keys()):
        parts.setdefault(official_part(name), []).append(name)
    q = cfg.qformer
    llm_prefix = _llm_prefix(parts.get("LLM", ()))
    planners = {
        "vision": lambda ns: {"params": {"vision": siglip_plan(
            source, cfg.vision, missing, _root(ns, OFFICIAL_PARTS["vision"], last=True))}},
        "LLM": lambda ns: {"params": {"llm": qwen2_plan(source, cfg.llm, missing, llm_prefix)}},
        "Whisper": lambda ns: {"params": {"audio": {
            "whisper": whisper_plan(source, cfg.audio, missing,
                                    _root(ns, OFFICIAL_PARTS["Whisper"]) + "speech_encoder."),
            **plan_tree(source.sub(_root(ns, OFFICIAL_PARTS["Whisper"])), ln("ln_speech", "ln_speech"),
                        missing=missing)}}},
        "vision connector": lambda ns: {"adapter": {"vision_connector": vision_connector_plan(
            source, missing, _root(ns, OFFICIAL_PARTS["vision connector"]))}},
        "Q-Former": lambda ns: {"adapter": {"audio_connector": {"qformer": plan_tree(
            source.sub(_root(ns, ("speech_Qformer",)) + "speech_Qformer.bert."),
            qformer_entries(q.num_layers, q.cross_attention_freq, "lavis"), missing=missing)}}},
        "audio projections": lambda ns: {"adapter": {"audio_connector": plan_tree(
            source.sub(_root(ns, OFFICIAL_PARTS["audio projections"])),
            [("query", "speech_query_tokens", squeeze0), *lin("audio_proj", "speech_llama_proj"),
             *(lin("final_linear_0", "final_linear.0") + lin("final_linear_1", "final_linear.2")
               if q.use_final_linear else [])], missing=missing)}},
    }
    out = [_part_plan(where, part, parts[part], lambda p=part: planners[p](parts[p]), missing)
           for part in planners if part in parts]
    lora_tree = official_lora_plan(lora, cfg.llm, missing,
                                   llm_prefix if "LLM" in parts else None)
    if lora_tree:
        out.append({"lora": lora_tree})
    return merge_variables(*out)


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
