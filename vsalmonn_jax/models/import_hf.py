"""Name maps from PyTorch checkpoints (transformers SigLIP / Whisper / LLaVA-OneVision / BLIP-2 Q-Former)
to this package's parameter trees; the official video-SALMONN 2 release is in import_release.py.

A checkpoint is read as a flat {name: tensor} (a `Source`: safetensors files memory-mapped, torch state
dicts work too). Each map lists (our path, their name, transform) with `{i}` for the layer index. A
map is first turned into a *plan* (a tree of `Lazy` leaves: names, transform, shape; nothing read),
which is then either materialised on the host (`load_tree`) or read shard by shard onto a mesh
(models/pretrained.py).
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable, Iterable, Mapping

import numpy as np
from flax import traverse_util

Transform = Callable[[np.ndarray], np.ndarray]


def linear(w: np.ndarray) -> np.ndarray:
    """torch Linear weight [out, in] -> kernel [in, out] (a view)."""
    return w.T


def same(w: np.ndarray) -> np.ndarray:
    return w


def conv2d(w: np.ndarray) -> np.ndarray:
    """torch Conv2d [out, in, kh, kw] -> [kh, kw, in, out] (a view)."""
    return w.transpose(2, 3, 1, 0)


def conv1d(w: np.ndarray) -> np.ndarray:
    """torch Conv1d [out, in, k] -> [k, in, out] (a view)."""
    return w.transpose(2, 1, 0)


def squeeze0(w: np.ndarray) -> np.ndarray:
    """[1, ...] -> [...] (e.g. the Q-Former query [1, nq, H] -> [nq, H])."""
    return w.reshape(w.shape[1:])


def _np_dtype(value) -> np.dtype:
    """numpy dtype a stored tensor is read as (torch bf16 as ml_dtypes.bfloat16, see _torch_view)."""
    if hasattr(value, "detach"):  # torch
        return _torch_view(value[(0,) * value.ndim] if value.ndim else value).dtype
    return np.dtype(value.dtype)


def _torch_view(value) -> np.ndarray:
    """A torch tensor as numpy without a copy (a memory-mapped `torch.load(mmap=True)` tensor stays
    mapped); bf16 is reinterpreted as ml_dtypes.bfloat16, which numpy lacks natively."""
    import ml_dtypes
    import torch

    value = value.detach().cpu()
    if value.dtype == torch.bfloat16:
        return value.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return value.numpy()


class Source:
    """Lazy flat view of a checkpoint: a dict of arrays / torch tensors, or a safetensors file or
    directory (memory-mapped through safetensors_io.SafetensorsReader, bf16 included). `alias` maps
    the names shown here to the stored names (the official release's prefixes stripped)."""

    def __init__(self, tensors: Mapping[str, object] | str | pathlib.Path, prefix: str = "",
                 alias: Mapping[str, str] | None = None):
        self.prefix = prefix
        if isinstance(tensors, (str, pathlib.Path)):
            from vsalmonn_jax.safetensors_io import SafetensorsReader

            self._store = SafetensorsReader(tensors)
        else:
            self._store = tensors if hasattr(tensors, "keys") and not isinstance(tensors, dict) \
                else dict(tensors)
        self._alias = None if alias is None else dict(alias)

    def _names(self) -> Iterable[str]:
        return self._alias.keys() if self._alias is not None else self._store.keys()

    def keys(self) -> set[str]:
        return {k[len(self.prefix):] for k in self._names() if k.startswith(self.prefix)}

    def stored_name(self, name: str) -> str:
        full = self.prefix + name
        return self._alias.get(full, full) if self._alias is not None else full

    def __contains__(self, name: str) -> bool:
        full = self.prefix + name
        return full in self._alias if self._alias is not None else full in self._store

    def meta(self, name: str) -> tuple[tuple[int, ...], np.dtype]:
        """(shape, dtype) of a tensor without reading it (headers only)."""
        if name not in self:
            raise KeyError(f"checkpoint has no tensor {self.prefix + name!r}")
        stored = self.stored_name(name)
        if hasattr(self._store, "shape") and hasattr(self._store, "dtype"):  # SafetensorsReader
            return self._store.shape(stored), self._store.dtype(stored)
        value = self._store[stored]
        return tuple(value.shape), _np_dtype(value)

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self:
            raise KeyError(f"checkpoint has no tensor {self.prefix + name!r}")
        value = self._store[self.stored_name(name)]
        return _torch_view(value) if hasattr(value, "detach") else np.asarray(value)

    def find_prefix(self, suffix: str) -> str:
        """The prefix under which `suffix` occurs (e.g. 'vision_tower.vision_model.'); error if none."""
        hits = sorted(k[: -len(suffix)] for k in self.keys() if k.endswith(suffix))
        if not hits:
            raise KeyError(f"checkpoint has no tensor ending in {suffix!r}")
        return min(hits, key=len)

    def has(self, suffix: str) -> bool:
        return any(k.endswith(suffix) for k in self.keys())

    def sub(self, prefix: str) -> Source:
        view = Source.__new__(Source)
        view._store, view._alias, view.prefix = self._store, self._alias, self.prefix + prefix
        return view


@dataclasses.dataclass(frozen=True)
class Lazy:
    """One destination array, not yet read: `names` (one, or one per stacked layer) in `source`,
    each passed through `fn` (a view), stacked when `stacked`. `shape` is ours."""

    source: Source
    names: tuple[str, ...]
    fn: Transform
    shape: tuple[int, ...]
    dtype: np.dtype
    stacked: bool

    def read(self, index=None, dtype=None) -> np.ndarray:
        """The array (or the block `index`, a tuple of slices) as `dtype` (default: stored)."""
        index = tuple(index) if index is not None else (slice(None),) * len(self.shape)
        if self.stacked:
            rows = [np.asarray(self.fn(self.source[self.names[i]])[index[1:]])
                    for i in range(len(self.names))[index[0]]]
            out = np.stack(rows) if rows else np.zeros((0, *self.shape[1:]), self.dtype)
        else:
            out = np.asarray(self.fn(self.source[self.names[0]])[index])
        return np.ascontiguousarray(out, dtype=dtype or self.dtype)

    def stored_names(self) -> list[str]:
        return [self.source.stored_name(n) for n in self.names]


def _lazy(source: Source, names: list[str], fn: Transform, stacked: bool) -> Lazy:
    shape, dtype = source.meta(names[0])
    ours = fn(np.broadcast_to(np.zeros((), dtype), shape)).shape  # transform a 0-byte view
    return Lazy(source, tuple(names), fn, ((len(names),) if stacked else ()) + tuple(ours),
                np.dtype(dtype), stacked)


Entry = tuple[str, str, Transform]


def plan_tree(source: Source, entries: Iterable[Entry], num_layers: int = 0,
              layer_entries: Iterable[Entry] = (), layer_offset: int = 0,
              missing: list[str] | None = None) -> dict:
    """Nested tree of `Lazy` leaves: `entries` once, `layer_entries` stacked over `num_layers`
    (their name uses {i} = layer_offset + index; our path sits under "layers/"). A missing tensor
    raises KeyError naming it, or is appended to `missing` (and its leaf left out) when given."""
    flat = {}

    def add(path: tuple[str, ...], names: list[str], fn: Transform, stacked: bool) -> None:
        absent = [source.prefix + n for n in names if n not in source]
        if absent:
            if missing is None:
                raise KeyError(f"checkpoint has no tensor {absent[0]!r}")
            missing.extend(absent)
            return
        flat[path] = _lazy(source, names, fn, stacked)

    for ours, theirs, fn in entries:
        add(tuple(ours.split("/")), [theirs], fn, False)
    for ours, theirs, fn in layer_entries:
        add(("layers", *ours.split("/")),
            [theirs.format(i=layer_offset + i) for i in range(num_layers)], fn, True)
    return traverse_util.unflatten_dict(flat)


def materialize(tree: Mapping, dtype=None) -> dict:
    """A plan -> host numpy arrays (whole tensors; `dtype` default: as stored)."""
    return {k: (materialize(v, dtype) if isinstance(v, Mapping) else v.read(dtype=dtype))
            for k, v in tree.items()}


def load_tree(source: Source, entries: Iterable[Entry], num_layers: int = 0,
              layer_entries: Iterable[Entry] = (), layer_offset: int = 0, dtype=None) -> dict:
    """`plan_tree` materialised on the host (one layer tensor read at a time)."""
    return materialize(plan_tree(source, entries, num_layers, layer_entries, layer_offset), dtype)


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


def siglip_plan(source: Source, cfg, missing: list[str] | None = None,
                prefix: str | None = None) -> dict:
    """SiglipVision plan; the tower's prefix (`vision_model.`, `vision_tower.vision_model.`, ...)
    is found from its patch embedding unless given. Layers past `cfg.used_layers` are never read."""
    source = source.sub(source.find_prefix("embeddings.patch_embedding.weight") if prefix is None
                        else prefix)
    return plan_tree(source, SIGLIP_ENTRIES, cfg.used_layers, SIGLIP_LAYER_ENTRIES, missing=missing)


def siglip_params(source: Source, cfg) -> dict:
    return materialize(siglip_plan(source, cfg))


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


def whisper_plan(source: Source, cfg, missing: list[str] | None = None,
                 prefix: str | None = None) -> dict:
    """WhisperEncoder plan; the encoder's prefix (`encoder.`, `model.encoder.`, `speech_encoder.`)
    is found from conv1 unless given."""
    source = source.sub(source.find_prefix("conv1.weight") if prefix is None else prefix)
    return plan_tree(source, WHISPER_ENTRIES, cfg.num_layers, WHISPER_LAYER_ENTRIES, missing=missing)


def whisper_params(source: Source, cfg) -> dict:
    return materialize(whisper_plan(source, cfg))


# ------------------------------------------------------------------------------ Q-Former ----

def ln(ours: str, theirs: str) -> list[Entry]:
    return [(f"{ours}/scale", f"{theirs}.weight", same), (f"{ours}/bias", f"{theirs}.bias", same)]


def lin(ours: str, theirs: str) -> list[Entry]:
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
    entries = ln("layernorm", top)
    for i in range(num_layers):
        blocks = [("self_attention", "attention")]
        if i % cross_every == 0:
            blocks.append(("cross_attention", "crossattention"))
        for ours, theirs in blocks:
            base = f"encoder.layer.{i}.{theirs}"
            for proj in ("query", "key", "value"):
                entries += lin(f"layers_{i}/{ours}/{proj}", f"{base}.{attn_inner}.{proj}")
            entries += lin(f"layers_{i}/{ours}/output", f"{base}.output.dense")
            entries += ln(f"layers_{i}/{ours}/output_norm", f"{base}.output.LayerNorm")
        entries += lin(f"layers_{i}/intermediate", f"encoder.layer.{i}.intermediate_query.dense")
        entries += lin(f"layers_{i}/output", f"encoder.layer.{i}.output_query.dense")
        entries += ln(f"layers_{i}/output_norm", f"encoder.layer.{i}.output_query.LayerNorm")
    return entries


def qformer_params(source: Source, cfg, style: str = "hf") -> dict:
    """QFormer (`adapter`) tree from a Blip2QFormerModel ("hf") or a LAVIS BERT Q-Former ("lavis")."""
    return load_tree(source, qformer_entries(cfg.num_layers, cfg.cross_attention_freq, style))


# ------------------------------------------- LLaVA-OneVision vision connector (projector, newline) ----

def vision_connector_plan(source: Source, missing: list[str] | None = None,
                          prefix: str | None = None) -> dict:
    """VisionConnector (`adapter`) plan: projector from `multi_modal_projector.linear_{1,2}`
    (transformers) or `mm_projector.{0,2}` (LLaVA-NeXT / video-SALMONN 2), plus `image_newline`;
    both under `prefix` when given (else each found from its own name)."""
    find = (lambda suffix: prefix) if prefix is not None else source.find_prefix
    if any(k.startswith(prefix or "") and ".multi_modal_projector." in f".{k}" for k in source.keys()):
        base = find("multi_modal_projector.linear_1.weight") + "multi_modal_projector."
        first, second = base + "linear_1", base + "linear_2"
    else:
        base = find("mm_projector.0.weight") + "mm_projector."
        first, second = base + "0", base + "2"
    newline = find("image_newline") + "image_newline"
    return plan_tree(source, lin("projector/linear_1", first) + lin("projector/linear_2", second)
                     + [("image_newline", newline, same)], missing=missing)


def vision_connector_params(source: Source) -> dict:
    return materialize(vision_connector_plan(source))


# ------------------------------------------------------------------------ Qwen2 (the LLM) ----

def qwen2_plan(source: Source, llm_cfg, missing: list[str] | None = None,
               prefix: str | None = None) -> dict:
    """Qwen2 plan through the lead's name map (models/qwen2_hf.py), with the LLM's prefix found
    from `embed_tokens.weight` (`model.`, `model.language_model.`, `language_model.model.`, ...)
    unless given; scan layout stacks the layers, else `layers_{i}`. A tied config with a stored
    lm_head that differs from the embedding -> CheckpointError."""
    from vsalmonn_jax.models import qwen2_hf

    prefix = source.find_prefix("embed_tokens.weight") if prefix is None else prefix
    heads = sorted((k for k in source.keys() if k.endswith("lm_head.weight")), key=lambda k: (len(k), k))
    if llm_cfg.tie_word_embeddings and heads:   # the logits would use the embedding instead
        check_tied_head(source, heads[0], prefix + "embed_tokens.weight")
    entries, layer_entries = [], []
    for entry in qwen2_hf.name_map(llm_cfg, prefix, heads[0] if heads else "lm_head.weight"):
        fn = linear if entry.transpose else same
        if not entry.per_layer:
            entries.append(("/".join(entry.path), entry.hf_name, fn))
        elif llm_cfg.scan_layers:
            layer_entries.append(("/".join(entry.path[1:]), entry.hf_name, fn))
        else:
            entries += [("/".join((f"layers_{i}",) + entry.path[1:]), entry.hf_name.format(i=i), fn)
                        for i in range(llm_cfg.num_layers)]
    return plan_tree(source, entries, llm_cfg.num_layers, layer_entries, missing=missing)


def same_tensor(source: Source, a: str, b: str, rows: int = 8192) -> bool:
    """Whether two stored tensors are equal (shape and values), compared `rows` rows at a time."""
    if source.meta(a)[0] != source.meta(b)[0]:
        return False
    x, y = np.atleast_1d(source[a]), np.atleast_1d(source[b])
    return all(np.array_equal(np.asarray(x[i:i + rows]), np.asarray(y[i:i + rows]))
               for i in range(0, x.shape[0], rows))


def check_tied_head(source: Source, head: str, embed: str) -> None:
    """A tied config never reads a stored output layer: fine when it equals the embedding (a tied
    model saved whole), else the logits would silently differ from the checkpoint's."""
    from vsalmonn_jax.safetensors_io import CheckpointError

    if embed in source and not same_tensor(source, head, embed):
        raise CheckpointError(
            f"the checkpoint stores an output layer {source.stored_name(head)!r} that differs from "
            f"{source.stored_name(embed)!r}, but model.llm.tie_word_embeddings is True (the logits "
            "would use the embedding): set --config.model.llm.tie_word_embeddings=False (the "
            "checkpoint's config.json says tie_word_embeddings: false)")


def qwen2_params(source: Source, llm_cfg) -> dict:
    return materialize(qwen2_plan(source, llm_cfg))


# ------------------------------------------------------------ whole checkpoints (re-exported) ----

_RELEASE = ("cast", "llava_plan", "load_llava_onevision", "load_official", "load_pretrained",
            "load_whisper", "merge_variables", "official_lora", "official_plan", "official_view",
            "open_official", "whisper_model_plan")


def __getattr__(name: str):
    """Whole-checkpoint loaders live in import_release.py (which builds on this module's maps)."""
    if name in _RELEASE:
        from vsalmonn_jax.models import import_release

        return getattr(import_release, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
