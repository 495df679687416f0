"""Name maps from PyTorch checkpoints (transformers SigLIP / Whisper / LLaVA-OneVision / BLIP-2 Q-Former,
and the official video-SALMONN 2 release) to this package's parameter trees.

A checkpoint is read as a flat {name: array} (a `Source`: safetensors files are streamed tensor by
tensor, torch state dicts work too); each map lists (our path, their name, transform) with `{i}` for
the layer index, and stacked layers are assembled one tensor at a time.
"""

from __future__ import annotations

import json
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
    """Lazy flat view of a checkpoint: a dict of arrays, or a directory / file of safetensors."""

    def __init__(self, tensors: Mapping[str, object] | str | pathlib.Path, prefix: str = ""):
        self.prefix = prefix
        if isinstance(tensors, (str, pathlib.Path)):
            from safetensors import safe_open

            path = pathlib.Path(tensors)
            files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
            if not files:
                raise FileNotFoundError(f"no *.safetensors files in {path}")
            self._handles = {}
            for file in files:
                handle = safe_open(str(file), framework="numpy")
                for key in handle.keys():
                    self._handles[key] = handle
            self._dict = None
        else:
            self._dict = dict(tensors)
            self._handles = None

    def keys(self) -> set[str]:
        names = self._dict.keys() if self._dict is not None else self._handles.keys()
        return {k[len(self.prefix):] for k in names if k.startswith(self.prefix)}

    def __contains__(self, name: str) -> bool:
        full = self.prefix + name
        return full in (self._dict if self._dict is not None else self._handles)

    def __getitem__(self, name: str) -> np.ndarray:
        full = self.prefix + name
        if self._dict is not None:
            if full not in self._dict:
                raise KeyError(f"checkpoint has no tensor {full!r}")
            value = self._dict[full]
            if hasattr(value, "detach"):  # torch tensor
                value = value.detach().float().cpu().numpy()
            return np.asarray(value)
        if full not in self._handles:
            raise KeyError(f"checkpoint has no tensor {full!r}")
        return self._handles[full].get_tensor(full)

    def find_prefix(self, suffix: str) -> str:
        """The prefix under which `suffix` occurs (e.g. 'vision_tower.vision_model.'); error if none."""
        hits = sorted(k[: -len(suffix)] for k in self.keys() if k.endswith(suffix))
        if not hits:
            raise KeyError(f"checkpoint has no tensor ending in {suffix!r}")
        return min(hits, key=len)

    def sub(self, prefix: str) -> Source:
        view = Source.__new__(Source)
        view._dict, view._handles, view.prefix = self._dict, self._handles, self.prefix + prefix
        return view


Entry = tuple[str, str, Transform]


def load_tree(source: Source, entries: Iterable[Entry], num_layers: int = 0,
              layer_entries: Iterable[Entry] = (), layer_offset: int = 0,
              dtype=np.float32) -> dict:
    """Assemble a nested param tree: `entries` once, `layer_entries` stacked over `num_layers`
    (their name uses {i} = layer_offset + index; our path sits under "layers/")."""
    flat = {}
    for ours, theirs, fn in entries:
        flat[tuple(ours.split("/"))] = fn(source[theirs]).astype(dtype)
    for ours, theirs, fn in layer_entries:
        first = fn(source[theirs.format(i=layer_offset)])
        stacked = np.empty((num_layers, *first.shape), dtype)
        stacked[0] = first
        for i in range(1, num_layers):
            stacked[i] = fn(source[theirs.format(i=layer_offset + i)])
        flat[("layers", *ours.split("/"))] = stacked
    return traverse_util.unflatten_dict(flat)


def read_config(path: str | pathlib.Path) -> dict:
    return json.loads((pathlib.Path(path) / "config.json").read_text())


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
