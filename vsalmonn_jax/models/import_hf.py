"""Name maps from PyTorch checkpoints (transformers SigLIP / Whisper / LLaVA-OneVision / BLIP-2 Q-Former,
and the official video-SALMONN 2 release) to this package's parameter trees.

A checkpoint is read as a flat {name: array} (a `Source`: safetensors files are streamed tensor by
tensor, torch state dicts work too); each map lists (our path, their name, transform) with `{i}` for
the layer index, and stacked layers are assembled one tensor at a time.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Iterable, Mapping

import numpy as np
from flax import traverse_util

Transform = Callable[[np.ndarray], np.ndarray]


def linear(w: np.ndarray) -> np.ndarray:
    """torch Linear weight [out, in] -> kernel [in, out]."""
    return np.ascontiguousarray(w.T)


def same(w: np.ndarray) -> np.ndarray:
    return w


def conv2d(w: np.ndarray) -> np.ndarray:
    """torch Conv2d [out, in, kh, kw] -> [kh, kw, in, out]."""
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0))


def conv1d(w: np.ndarray) -> np.ndarray:
    """torch Conv1d [out, in, k] -> [k, in, out]."""
    return np.ascontiguousarray(w.transpose(2, 1, 0))


def squeeze0(w: np.ndarray) -> np.ndarray:
    """[1, ...] -> [...] (e.g. the Q-Former query [1, nq, H] -> [nq, H])."""
    return w.reshape(w.shape[1:])


class Source:
    """Lazy flat view of a checkpoint: a dict of arrays / torch tensors, or a safetensors file or
    directory (memory-mapped through safetensors_io.SafetensorsReader, bf16 included)."""

    def __init__(self, tensors: Mapping[str, object] | str | pathlib.Path, prefix: str = ""):
        self.prefix = prefix
        if isinstance(tensors, (str, pathlib.Path)):
            from vsalmonn_jax.safetensors_io import SafetensorsReader

            self._store = SafetensorsReader(tensors)
        else:
            self._store = dict(tensors)

    def keys(self) -> set[str]:
        return {k[len(self.prefix):] for k in self._store.keys() if k.startswith(self.prefix)}

    def __contains__(self, name: str) -> bool:
        return self.prefix + name in self._store

    def __getitem__(self, name: str) -> np.ndarray:
        full = self.prefix + name
        if full not in self._store:
            raise KeyError(f"checkpoint has no tensor {full!r}")
        value = self._store[full]
        if hasattr(value, "detach"):  # torch tensor (bf16 has no numpy twin: go through fp32)
            value = value.detach().cpu()
            value = value.float().numpy() if value.dtype.is_floating_point else value.numpy()
        return np.asarray(value)

    def find_prefix(self, suffix: str) -> str:
        """The prefix under which `suffix` occurs (e.g. 'vision_tower.vision_model.'); error if none."""
        hits = sorted(k[: -len(suffix)] for k in self.keys() if k.endswith(suffix))
        if not hits:
            raise KeyError(f"checkpoint has no tensor ending in {suffix!r}")
        return min(hits, key=len)

    def sub(self, prefix: str) -> Source:
        view = Source.__new__(Source)
        view._store, view.prefix = self._store, self.prefix + prefix
        return view


Entry = tuple[str, str, Transform]


def load_tree(source: Source, entries: Iterable[Entry], num_layers: int = 0,
              layer_entries: Iterable[Entry] = (), layer_offset: int = 0,
              dtype=None) -> dict:
    """Assemble a nested param tree: `entries` once, `layer_entries` stacked over `num_layers`
    (their name uses {i} = layer_offset + index; our path sits under "layers/"). Arrays keep the
    checkpoint's dtype unless `dtype` is given; one layer tensor is read at a time."""
    flat = {}
    for ours, theirs, fn in entries:
        value = fn(source[theirs])
        flat[tuple(ours.split("/"))] = np.asarray(value, dtype or value.dtype)
    for ours, theirs, fn in layer_entries:
        first = fn(source[theirs.format(i=layer_offset)])
        stacked = np.empty((num_layers, *first.shape), dtype or first.dtype)
        stacked[0] = first
        for i in range(1, num_layers):
            stacked[i] = fn(source[theirs.format(i=layer_offset + i)])
        flat[("layers", *ours.split("/"))] = stacked
    return traverse_util.unflatten_dict(flat)


# ---------------------------------------------------------------- SigLIP (transformers names) ----

SIGLIP_ENTRIES: list[Entry] = [
    ("embeddings/patch_embedding", "embeddings.patch_embedding.weight", conv2d),
    ("embeddings/patch_bias", "embeddings.patch_embedding.bias", same),
    ("embeddings/position_embedding", "embeddings.position_embedding.weight", same),
]
SIGLIP_LAYER_ENTRIES: list[Entry] = [
    (f"{ours}/{p}", f"encoder.layers.{{i}}.{theirs}.{q}", linear if p == "kernel" else same)
    for ours, theirs in [("q_proj", "self_attn.q_proj"), ("k_proj", "self_attn.k_proj"),
                         ("v_proj", "self_attn.v_proj"), ("out_proj", "self_attn.out_proj"),
                         ("fc1", "mlp.fc1"), ("fc2", "mlp.fc2")]
    for p, q in [("kernel", "weight"), ("bias", "bias")]
] + [
    (f"{norm}/{p}", f"encoder.layers.{{i}}.{norm}.{q}", same)
    for norm in ("layer_norm1", "layer_norm2") for p, q in [("scale", "weight"), ("bias", "bias")]
]


def siglip_params(source: Source, cfg) -> dict:
    """SiglipVision params; the tower's prefix (`vision_model.`, `vision_tower.vision_model.`, ...)
    is found from its patch embedding. Layers past `cfg.used_layers` are never read."""
    source = source.sub(source.find_prefix("embeddings.patch_embedding.weight"))
    return load_tree(source, SIGLIP_ENTRIES, cfg.used_layers, SIGLIP_LAYER_ENTRIES)


# ------------------------------------------------------------ Whisper encoder (transformers) ----

WHISPER_ENTRIES: list[Entry] = [
    ("stem/conv1_kernel", "conv1.weight", conv1d), ("stem/conv1_bias", "conv1.bias", same),
    ("stem/conv2_kernel", "conv2.weight", conv1d), ("stem/conv2_bias", "conv2.bias", same),
    ("stem/embed_positions", "embed_positions.weight", same),
    ("layer_norm/scale", "layer_norm.weight", same), ("layer_norm/bias", "layer_norm.bias", same),
]
WHISPER_LAYER_ENTRIES: list[Entry] = [
    (f"{name}/{p}", f"layers.{{i}}.{theirs}.{q}", linear if p == "kernel" else same)
    for name, theirs in [("q_proj", "self_attn.q_proj"), ("k_proj", "self_attn.k_proj"),
                         ("v_proj", "self_attn.v_proj"), ("out_proj", "self_attn.out_proj"),
                         ("fc1", "fc1"), ("fc2", "fc2")]
    for p, q in [("kernel", "weight"), ("bias", "bias")] if not (name == "k_proj" and p == "bias")
] + [
    (f"{norm}/{p}", f"layers.{{i}}.{norm}.{q}", same)
    for norm in ("self_attn_layer_norm", "final_layer_norm")
    for p, q in [("scale", "weight"), ("bias", "bias")]
]


def whisper_params(source: Source, cfg) -> dict:
    """WhisperEncoder params; the encoder's prefix (`encoder.`, `model.encoder.`, `speech_encoder.`)
    is found from conv1."""
    source = source.sub(source.find_prefix("conv1.weight"))
    return load_tree(source, WHISPER_ENTRIES, cfg.num_layers, WHISPER_LAYER_ENTRIES)


# ------------------------------------------------------------------------------ Q-Former ----

def _ln(ours: str, theirs: str) -> list[Entry]:
    return [(f"{ours}/scale", f"{theirs}.weight", same), (f"{ours}/bias", f"{theirs}.bias", same)]


def _lin(ours: str, theirs: str) -> list[Entry]:
    return [(f"{ours}/kernel", f"{theirs}.weight", linear), (f"{ours}/bias", f"{theirs}.bias", same)]


def qformer_entries(num_layers: int, cross_every: int, style: str) -> list[Entry]:
    """Q-Former names: style "hf" = transformers Blip2QFormerModel, "lavis" = the BERT Q-Former of
    SALMONN / video-SALMONN 2 (`bert.` prefix stripped by the caller)."""
    if style == "hf":
        top, attn_inner = "layernorm", "attention"
    elif style == "lavis":
        top, attn_inner = "embeddings.LayerNorm", "self"
    else:
        raise ValueError(f"unknown Q-Former naming style {style!r}")
    entries = _ln("layernorm", top)
    for i in range(num_layers):
        blocks = [("self_attention", "attention")]
        if i % cross_every == 0:
            blocks.append(("cross_attention", "crossattention"))
        for ours, theirs in blocks:
            base = f"encoder.layer.{i}.{theirs}"
            for proj in ("query", "key", "value"):
                entries += _lin(f"layers_{i}/{ours}/{proj}", f"{base}.{attn_inner}.{proj}")
            entries += _lin(f"layers_{i}/{ours}/output", f"{base}.output.dense")
            entries += _ln(f"layers_{i}/{ours}/output_norm", f"{base}.output.LayerNorm")
        entries += _lin(f"layers_{i}/intermediate", f"encoder.layer.{i}.intermediate_query.dense")
        entries += _lin(f"layers_{i}/output", f"encoder.layer.{i}.output_query.dense")
        entries += _ln(f"layers_{i}/output_norm", f"encoder.layer.{i}.output_query.LayerNorm")
    return entries


def qformer_params(source: Source, cfg, style: str = "hf") -> dict:
    """QFormer (`adapter`) tree from a Blip2QFormerModel ("hf") or a LAVIS BERT Q-Former ("lavis")."""
    return load_tree(source, qformer_entries(cfg.num_layers, cfg.cross_attention_freq, style))


# ------------------------------------------- LLaVA-OneVision vision connector (projector, newline) ----

def vision_connector_params(source: Source) -> dict:
    """VisionConnector (`adapter`) tree: projector from `multi_modal_projector.linear_{1,2}`
    (transformers) or `mm_projector.{0,2}` (LLaVA-NeXT / video-SALMONN 2), plus `image_newline`."""
    keys = source.keys()
    if any(k.endswith("multi_modal_projector.linear_1.weight") for k in keys):
        base = source.find_prefix("multi_modal_projector.linear_1.weight") + "multi_modal_projector."
        first, second = base + "linear_1", base + "linear_2"
    else:
        base = source.find_prefix("mm_projector.0.weight") + "mm_projector."
        first, second = base + "0", base + "2"
    newline = source.find_prefix("image_newline") + "image_newline"
    return load_tree(source, _lin("projector/linear_1", first) + _lin("projector/linear_2", second)
                     + [("image_newline", newline, same)])


# ------------------------------------------------------------------------ Qwen2 (the LLM) ----

def qwen2_params(source: Source, llm_cfg) -> dict:
    """Qwen2 params through the lead's name map (models/qwen2_hf.py), with the LLM's prefix found
    from `embed_tokens.weight` (`model.`, `model.language_model.`, `language_model.model.`, ...)."""
    from vsalmonn_jax.models import qwen2_hf

    prefix = source.find_prefix("embed_tokens.weight")
    heads = sorted((k for k in source.keys() if k.endswith("lm_head.weight")), key=len)
    entries, layer_entries = [], []
    for entry in qwen2_hf.name_map(llm_cfg, prefix, heads[0] if heads else "lm_head.weight"):
        fn = linear if entry.transpose else same
        if entry.per_layer:
            layer_entries.append(("/".join(entry.path[1:]), entry.hf_name, fn))
        else:
            entries.append(("/".join(entry.path), entry.hf_name, fn))
    tree = load_tree(source, entries, llm_cfg.num_layers, layer_entries)
    if not llm_cfg.scan_layers:
        stacked = tree.pop("layers")
        for i in range(llm_cfg.num_layers):
            tree[f"layers_{i}"] = traverse_util.unflatten_dict(
                {k: v[i] for k, v in traverse_util.flatten_dict(stacked).items()})
    return tree


# --------------------------------------------------------------- whole-model checkpoints ----

def _cast(tree: dict, dtype) -> dict:
    import jax.numpy as jnp

    return {k: (_cast(v, dtype) if isinstance(v, dict) else jnp.asarray(v, dtype))
            for k, v in tree.items()}


def load_llava_onevision(source: Source | str | pathlib.Path, cfg) -> dict:
    """LLaVA-OneVision (transformers or LLaVA-NeXT naming) -> {"params": {vision, llm},
    "adapter": {vision_connector}}; `cfg` is an AVConfig. Whisper comes from `load_whisper`."""
    path = None if isinstance(source, Source) else pathlib.Path(source)
    source = source if path is None else Source(path)
    if path is not None and path.is_dir():  # stream the LLM tensor by tensor (qwen2_hf.load_hf)
        from vsalmonn_jax.models import qwen2_hf

        heads = sorted((k for k in source.keys() if k.endswith("lm_head.weight")), key=len)
        llm, _ = qwen2_hf.load_hf(path, cfg.llm, model_prefix=source.find_prefix("embed_tokens.weight"),
                                  lm_head_name=heads[0] if heads else "lm_head.weight")
    else:
        llm = _cast(qwen2_params(source, cfg.llm), cfg.llm.param_dtype)
    return {"params": {"vision": _cast(siglip_params(source, cfg.vision), cfg.vision.param_dtype),
                       "llm": llm},
            "adapter": {"vision_connector": _cast(vision_connector_params(source), "float32")}}


def load_whisper(source: Source | str | pathlib.Path, cfg) -> dict:
    """A Whisper checkpoint (WhisperModel / WhisperForConditionalGeneration) -> {"params": {"audio":
    {"whisper": ..., "ln_speech": identity}}}. ln_speech is not part of Whisper: the official code
    creates it fresh (identity) and freezes it with Whisper (freeze_whisper); trained values, if any,
    come with the official file (`load_official`)."""
    import numpy as np_

    source = source if isinstance(source, Source) else Source(source)
    d = cfg.audio.d_model
    audio = {"whisper": whisper_params(source, cfg.audio),
             "ln_speech": {"scale": np_.ones(d, np_.float32), "bias": np_.zeros(d, np_.float32)}}
    return {"params": {"audio": _cast(audio, cfg.audio.param_dtype)}}


OFFICIAL_PREFIXES = ("module.", "base_model.model.")


def official_view(state: Mapping[str, object]) -> tuple[Source, dict[str, object]]:
    """Normalise an official video-SALMONN 2 state dict (all_parameters.bin / checkpoint-N.bin):
    strip DeepSpeed `module.` and PEFT `base_model.model.` prefixes and `.base_layer`; split the
    PEFT LoRA tensors (`<module>.lora_A.default.weight`) into a second dict keyed by module name."""
    base, lora = {}, {}
    for name, value in state.items():
        for prefix in OFFICIAL_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
        name = name.replace(".base_layer.", ".")
        if ".lora_A." in name or ".lora_B." in name:
            module, _, rest = name.partition(".lora_")
            lora[f"{module}.{rest[0]}"] = value  # "<module>.A" / "<module>.B"
        else:
            base[name] = value
    return Source(base), lora


def official_lora(lora: Mapping[str, object], llm_cfg) -> dict:
    """PEFT lora_A [r, in] / lora_B [out, r] per layer -> our {"llm": {"layers": {"self_attn":
    {"q_proj": {"a": [L, in, r], "b": [L, r, out]}}}}} (scan layout)."""
    source = Source(lora)
    prefix = next((k[: -len("layers.0.self_attn.q_proj.A")] for k in source.keys()
                   if k.endswith("layers.0.self_attn.q_proj.A")), None)
    if prefix is None:
        return {}
    entries = []
    for proj in ("q_proj", "k_proj", "v_proj"):
        if f"{prefix}layers.0.self_attn.{proj}.A" in source:
            entries += [(f"self_attn/{proj}/a", f"{prefix}layers.{{i}}.self_attn.{proj}.A", linear),
                        (f"self_attn/{proj}/b", f"{prefix}layers.{{i}}.self_attn.{proj}.B", linear)]
    return {"llm": load_tree(source, [], llm_cfg.num_layers, entries)}


def load_official(state: Mapping[str, object] | str | pathlib.Path, cfg) -> dict:
    """The official video-SALMONN 2 release (a torch state dict, or the path of one) -> the variables
    it contains: {"params": {vision?, llm?, audio?}, "adapter": {vision_connector?, audio_connector?},
    "lora": {llm}?}. Parts absent from the file (e.g. the base LLM when the file holds only the
    trainable weights) are left out, so the result can be merged over `load_llava_onevision`.

    Names (derived from llava/model/language_model/video_salmonn_2.py): model.vision_tower.
    vision_tower.vision_model.*, model.mm_projector.{0,2}, model.image_newline, model.embed_tokens /
    layers / norm, lm_head, speech_encoder.* (Whisper encoder), ln_speech, speech_Qformer.bert.*
    (LAVIS BERT names), speech_query_tokens [1, Q, 768], speech_llama_proj, final_linear.{0,2}.
    """
    if isinstance(state, (str, pathlib.Path)):
        import torch

        state = torch.load(str(state), map_location="cpu", weights_only=True)
    source, lora = official_view(state)
    keys = source.keys()
    has = lambda suffix: any(k.endswith(suffix) for k in keys)
    params, adapter = {}, {}
    if has("embeddings.patch_embedding.weight"):
        params["vision"] = _cast(siglip_params(source, cfg.vision), cfg.vision.param_dtype)
    if has("embed_tokens.weight"):
        params["llm"] = _cast(qwen2_params(source, cfg.llm), cfg.llm.param_dtype)
    if has("conv1.weight"):
        audio = {"whisper": whisper_params(source, cfg.audio)}
        audio["ln_speech"] = load_tree(source.sub(source.find_prefix("ln_speech.weight")),
                                       _ln("ln_speech", "ln_speech"))["ln_speech"]
        params["audio"] = _cast(audio, cfg.audio.param_dtype)
    if has("mm_projector.0.weight"):
        adapter["vision_connector"] = _cast(vision_connector_params(source), "float32")
    if has("speech_Qformer.bert.embeddings.LayerNorm.weight"):
        q = cfg.qformer
        base = source.find_prefix("speech_Qformer.bert.embeddings.LayerNorm.weight")
        connector = {"qformer": qformer_params(source.sub(base + "speech_Qformer.bert."), q, "lavis")}
        connector.update(load_tree(source.sub(base), [
            ("query", "speech_query_tokens", squeeze0),
            *_lin("audio_proj", "speech_llama_proj"),
            *(_lin("final_linear_0", "final_linear.0") + _lin("final_linear_1", "final_linear.2")
              if q.use_final_linear else [])]))
        adapter["audio_connector"] = _cast(connector, "float32")
    out = {"params": params, "adapter": adapter}
    lora_tree = official_lora(lora, cfg.llm)
    if lora_tree:
        out["lora"] = _cast(lora_tree, "float32")
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


def load_pretrained(cfg, rng, *, llava=None, whisper=None, official=None, lora=None) -> dict:
    """The starting variables of the real recipe: SigLIP + projector + image_newline + Qwen2 from a
    LLaVA-OneVision directory, the Whisper encoder from a Whisper directory, then (optionally) the
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
