"""Qwen2 weights <-> `transformers` safetensors checkpoints, by an explicit name map, tensor by tensor.

Import reads each tensor through a memory map straight into its (optionally sharded) destination, so a
7B import never holds the checkpoint twice; export writes one tensor at a time. Kept apart from the
model (as tunix does) so other importers (LLaVA-OneVision, the official release) reuse the map.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Callable, Mapping

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from vsalmonn_jax.models.qwen2 import Qwen2, Qwen2Config
from vsalmonn_jax.safetensors_io import CheckpointError, SafetensorsReader, write_safetensors_lazy


@dataclasses.dataclass(frozen=True)
class Entry:
    """One parameter: our path, the HF name (with `{i}` for a layer index), transpose or not."""

    path: tuple[str, ...]
    hf_name: str
    transpose: bool
    per_layer: bool


_LAYER = [  # (our sub-path under layers, HF name under model.layers.{i}, is a kernel to transpose)
    (("input_layernorm", "scale"), "input_layernorm.weight", False),
    (("post_attention_layernorm", "scale"), "post_attention_layernorm.weight", False),
    (("self_attn", "q_proj", "kernel"), "self_attn.q_proj.weight", True),
    (("self_attn", "q_proj", "bias"), "self_attn.q_proj.bias", False),
    (("self_attn", "k_proj", "kernel"), "self_attn.k_proj.weight", True),
    (("self_attn", "k_proj", "bias"), "self_attn.k_proj.bias", False),
    (("self_attn", "v_proj", "kernel"), "self_attn.v_proj.weight", True),
    (("self_attn", "v_proj", "bias"), "self_attn.v_proj.bias", False),
    (("self_attn", "o_proj", "kernel"), "self_attn.o_proj.weight", True),
    (("mlp", "gate_proj", "kernel"), "mlp.gate_proj.weight", True),
    (("mlp", "up_proj", "kernel"), "mlp.up_proj.weight", True),
    (("mlp", "down_proj", "kernel"), "mlp.down_proj.weight", True),
]


def name_map(config: Qwen2Config, model_prefix: str = "model.",
             lm_head_name: str = "lm_head.weight") -> list[Entry]:
    """Every parameter of `Qwen2(config)` and its `transformers` name.

    `model_prefix` is "model." for Qwen2ForCausalLM and e.g. "model.language_model." inside
    LlavaOnevisionForConditionalGeneration.
    """
    entries = [Entry(("embed_tokens", "embedding"), f"{model_prefix}embed_tokens.weight", False, False),
               Entry(("norm", "scale"), f"{model_prefix}norm.weight", False, False)]
    if not config.tie_word_embeddings:
        entries.append(Entry(("lm_head", "kernel"), lm_head_name, True, False))
    for sub, hf, transpose in _LAYER:
        entries.append(Entry(("layers",) + sub, f"{model_prefix}layers.{{i}}.{hf}", transpose, True))
    return entries


def _our_path(entry: Entry, layer: int | None, scan_layers: bool) -> tuple[str, ...]:
    if entry.per_layer and not scan_layers:
        return (f"layers_{layer}",) + entry.path[1:]
    return entry.path


def config_from_hf(hf: Mapping, **overrides) -> Qwen2Config:
    """A transformers Qwen2 `config.json` dict -> Qwen2Config (v4 `rope_theta` or v5 `rope_parameters`)."""
    rope = hf.get("rope_parameters") or {}
    heads = hf["num_attention_heads"]
    fields = dict(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads", heads),
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 1e6))),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=hf.get("max_position_embeddings", 32768),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)))
    fields.update(overrides)
    return Qwen2Config(**fields)


def config_to_hf(config: Qwen2Config, dtype: str) -> dict:
    return {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim, "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings, "use_sliding_window": False,
        "dtype": dtype, "torch_dtype": dtype,
    }


def _hf_shape(entry: Entry, our_shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(reversed(our_shape)) if entry.transpose else tuple(our_shape)


def read_params(reader: SafetensorsReader, config: Qwen2Config, abstract_params: Mapping,
                shardings: Mapping | None = None, model_prefix: str = "model.",
                lm_head_name: str = "lm_head.weight") -> dict:
    """Fill a tree shaped like `abstract_params` (ShapeDtypeStructs of Qwen2(config)) from `reader`.

    Each destination array is assembled from memory-mapped tensors by `jax.make_array_from_callback`,
    so every device reads only its own shard. Errors name the missing or mis-shaped tensor.
    """
    flat_abstract = traverse_util.flatten_dict(dict(abstract_params))
    flat_shardings = traverse_util.flatten_dict(dict(shardings)) if shardings is not None else {}
    out = {}
    for entry in name_map(config, model_prefix, lm_head_name):
        layers = range(config.num_layers) if entry.per_layer else [None]
        if entry.per_layer and not config.scan_layers:
            targets = [(_our_path(entry, i, False), [i]) for i in layers]
        else:
            targets = [(entry.path, list(layers))]
        for path, layer_ids in targets:
            if path not in flat_abstract:
                raise CheckpointError(f"parameter {'/'.join(path)} is not in the model")
            abstract = flat_abstract[path]
            stacked = entry.per_layer and config.scan_layers
            one_shape = abstract.shape[1:] if stacked else abstract.shape
            sources = [reader.get(entry.hf_name.format(i=i), _hf_shape(entry, one_shape))
                       for i in layer_ids]
            sharding = flat_shardings.get(path) or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            out[path] = jax.make_array_from_callback(
                abstract.shape, sharding, _slice_reader(sources, entry.transpose, stacked, abstract.dtype))
    return traverse_util.unflatten_dict(out)


def _slice_reader(sources: list[np.ndarray], transpose: bool, stacked: bool, dtype) -> Callable:
    def one(array: np.ndarray, index) -> np.ndarray:
        view = array.T if transpose else array
        return np.asarray(view[tuple(index)], dtype=dtype)

    def read(index):
        index = tuple(index)
        if not stacked:
            return one(sources[0], index)
        layer_index, rest = index[0], index[1:]
        return np.stack([one(sources[i], rest) for i in range(len(sources))[layer_index]])
    return read


def load_hf(path, config: Qwen2Config | None = None, *, param_dtype: str | None = None,
            scan_layers: bool | None = None, shardings: Mapping | None = None,
            model_prefix: str = "model.", lm_head_name: str = "lm_head.weight"):
    """A `transformers` Qwen2 checkpoint directory -> (params, Qwen2Config).

    `config` defaults to the directory's config.json; `param_dtype` / `scan_layers` override it.
    `shardings` (a tree of NamedShardings shaped like the params) places each tensor directly.
    """
    path = pathlib.Path(path)
    if config is None:
        config_file = path / "config.json"
        if not config_file.is_file():
            raise CheckpointError(f"{path}: no config.json (pass `config=` explicitly)")
        config = config_from_hf(json.loads(config_file.read_text(encoding="utf-8")))
    overrides = {k: v for k, v in dict(param_dtype=param_dtype, scan_layers=scan_layers).items()
                 if v is not None}
    config = config.replace(**overrides)
    abstract = jax.eval_shape(lambda: Qwen2(config).init(jax.random.PRNGKey(0), np.zeros((1, 1), np.int32)))
    params = read_params(SafetensorsReader(path), config, nn.unbox(abstract["params"]), shardings,
                         model_prefix, lm_head_name)
    return params, config


def save_hf(params: Mapping, config: Qwen2Config, path, dtype: str | None = None,
            filename: str = "model.safetensors") -> None:
    """Write `config.json` + one safetensors file in `transformers` Qwen2ForCausalLM naming.

    Tensors are gathered and written one at a time (`dtype` defaults to the params' own dtype).
    """
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    flat = traverse_util.flatten_dict(dict(params))
    entries = []
    for entry in name_map(config):
        for i in (range(config.num_layers) if entry.per_layer else [None]):
            stacked = entry.per_layer and config.scan_layers
            ours = _our_path(entry, i, config.scan_layers)
            if ours not in flat:
                raise CheckpointError(f"parameter {'/'.join(ours)} missing from the params to export")
            leaf = flat[ours]
            one_shape = leaf.shape[1:] if stacked else leaf.shape
            out_dtype = np.dtype(dtype) if dtype else np.dtype(leaf.dtype)

            def produce(leaf=leaf, i=i, stacked=stacked, transpose=entry.transpose):
                array = np.asarray(jax.device_get(leaf[i] if stacked else leaf))
                return array.T if transpose else array
            entries.append((entry.hf_name.format(i=i), _hf_shape(entry, one_shape), out_dtype, produce))
    write_safetensors_lazy(path / filename, entries, {"format": "pt"})
    dtype_name = str(np.dtype(dtype) if dtype else np.dtype(jax.tree.leaves(params)[0].dtype))
    (path / "config.json").write_text(json.dumps(config_to_hf(config, dtype_name), indent=2))
