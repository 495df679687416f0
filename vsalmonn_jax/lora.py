"""LoRA as its own pytree (the `lora` collection): build, merge into the base, count, and shard.

A target kernel `[..., in, out]` (a leading `[layers]` axis under nn.scan) gets `a: [..., in, rank]`
(Kaiming-uniform, as PEFT) and `b: [..., rank, out]` (zeros); the adapted layer computes
`x @ W + scale * dropout(x) @ a @ b` with `scale = alpha / rank`. No LoRA tree = LoRA disabled.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import zlib
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import PartitionSpec


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 128
    alpha: float = 256.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_config(cls, cfg: Mapping) -> LoraConfig:
        return cls(rank=int(cfg["rank"]), alpha=float(cfg["alpha"]), dropout=float(cfg["dropout"]),
                   targets=tuple(cfg["targets"]))


def is_target(module_path: tuple[str, ...], targets: tuple[str, ...]) -> bool:
    """A module is adapted when a pattern (fnmatch) matches its name or its '/'-joined path."""
    name, joined = module_path[-1], "/".join(module_path)
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(joined, p) for p in targets)


def target_kernels(params: Mapping, targets: tuple[str, ...]) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
    """{module path: kernel} for every `kernel` leaf under a module matching `targets`."""
    flat = traverse_util.flatten_dict(dict(params))
    found = {path[:-1]: leaf for path, leaf in flat.items()
             if path[-1] == "kernel" and is_target(path[:-1], targets)}
    if not found:
        raise ValueError(f"LoRA targets {targets} match no kernel in the parameter tree")
    return found


def _unbox(x):
    return x.unbox() if hasattr(x, "unbox") else x


def init_lora(rng: jax.Array, params: Mapping, cfg: LoraConfig) -> dict:
    """A fresh LoRA tree for `params` (arrays or ShapeDtypeStructs; boxed leaves are fine). fp32."""
    tree = {}
    for path, kernel in target_kernels(params, cfg.targets).items():
        shape = _unbox(kernel).shape
        *lead, fan_in, fan_out = shape
        key = jax.random.fold_in(rng, zlib.crc32("/".join(path).encode()))
        bound = 1.0 / np.sqrt(fan_in)  # kaiming_uniform(a=sqrt(5)) as in PEFT / torch.nn.Linear
        a = jax.random.uniform(key, (*lead, fan_in, cfg.rank), jnp.float32, -bound, bound)
        b = jnp.zeros((*lead, cfg.rank, fan_out), jnp.float32)
        tree[path + ("a",)] = a
        tree[path + ("b",)] = b
    return traverse_util.unflatten_dict(tree)


def merge(params: Mapping, lora: Mapping, scale: float) -> dict:
    """params with `W + scale * a @ b` (in fp32, cast back to W's dtype) for every adapted kernel.

    Jit it with `donate_argnums=0` at a round boundary so the old base is not kept alongside the new.
    """
    flat_lora = traverse_util.flatten_dict(dict(lora))
    flat = traverse_util.flatten_dict(dict(params))
    for path, leaf in flat_lora.items():
        if path[-1] != "a":
            continue
        module = path[:-1]
        kernel_path = module + ("kernel",)
        if kernel_path not in flat:
            raise KeyError(f"LoRA module {'/'.join(module)} has no kernel in params")
        kernel = flat[kernel_path]
        b = flat_lora[module + ("b",)]
        delta = jnp.matmul(leaf.astype(jnp.float32), b.astype(jnp.float32),
                           precision=jax.lax.Precision.HIGHEST)
        flat[kernel_path] = (kernel.astype(jnp.float32) + scale * delta).astype(kernel.dtype)
    return traverse_util.unflatten_dict(flat)


def count_params(tree) -> int:
    """Number of scalars in a tree (arrays, ShapeDtypeStructs or boxed leaves)."""
    return int(sum(np.prod(_unbox(x).shape, dtype=np.int64) for x in jax.tree.leaves(
        tree, is_leaf=lambda x: hasattr(x, "unbox"))))


def count_by_collection(variables: Mapping) -> dict[str, int]:
    """{collection: parameter count}, e.g. {"params": 7.6e9, "lora": 1.1e8, "adapter": ...}."""
    return {name: count_params(tree) for name, tree in variables.items()}


def lora_partition_specs(param_specs: Mapping, lora: Mapping) -> dict:
    """PartitionSpecs for a LoRA tree from its base kernels' specs: `a` keeps the kernel's input
    sharding, `b` its output sharding; the rank axis is replicated."""
    flat_specs = traverse_util.flatten_dict(dict(param_specs))
    out = {}
    for path, leaf in traverse_util.flatten_dict(dict(lora)).items():
        ndim = len(_unbox(leaf).shape)
        spec = tuple(flat_specs[path[:-1] + ("kernel",)])
        *lead, inp, outp = spec + (None,) * (ndim - len(spec))
        out[path] = PartitionSpec(*lead, inp, None) if path[-1] == "a" else PartitionSpec(*lead, None, outp)
    return traverse_util.unflatten_dict(out)
