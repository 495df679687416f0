"""Which mesh axes split an array's dimension inside the model: attention's shard_maps (xla, splash,
context) and the activation constraints (`constrain`).

A logical axis's mesh axes (jax.set_mesh + flax logical rules) when they divide the dimension;
none without a mesh, or for a size they do not divide (e.g. a one-row caption prompt: replicated).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax

# Logical names whose sizes come from the data (rows, positions, frames), not from the model.
DATA_AXES = ("batch", "length", "kv_length", "frames")


def _axes(logical: str) -> tuple[tuple[str, ...], int]:
    """(mesh axes of the mesh in scope that `logical` maps to, their shards in all); ((), 1) without
    a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return (), 1
    axes = nn.logical_to_mesh_axes((logical,))[0]
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    axes = tuple(axis for axis in axes if axis in mesh.axis_names)
    return axes, math.prod(int(mesh.shape[axis]) for axis in axes)


def mesh_axes(logical: str, size: int) -> tuple[str, ...]:
    """The mesh axes that the logical axis `logical` maps to, if they split `size` evenly; () = not
    split (also when they have one shard in all: a one-device run keeps its plain program)."""
    axes, shards = _axes(logical)
    return axes if shards > 1 and size % shards == 0 else ()


def batch_axes(batch: int) -> tuple[str, ...]:
    """The mesh axes that split a batch of `batch` rows (the logical `batch` axis)."""
    return mesh_axes("batch", batch)


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    """nn.with_logical_constraint(x, names), except that a data axis (DATA_AXES) smaller than its
    mesh axes' shards is replicated instead of padded to one row / position per shard: a one-row
    prompt on a data-parallel mesh, one decode position on `context` (so padded, the decode logits
    came out wrong on a data x context x tensor mesh: XLA's partitioner). Larger indivisible sizes
    (110 frames on context = 4) and model axes (heads, mlp, vocab) keep the rules' sharding,
    padded; `plan` flags the model ones."""
    def fit(name, size):
        if name not in DATA_AXES:
            return name
        return None if 0 < size < _axes(name)[1] else name

    return nn.with_logical_constraint(x, tuple(map(fit, names, x.shape)))
