"""Which mesh axes split the batch (and heads) inside attention's shard_maps (xla, splash, context).

A logical axis's mesh axes (jax.set_mesh + flax logical rules) when they divide the array's size;
none without a mesh, or for a size they do not divide (e.g. a one-row caption prompt: replicated).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax


def mesh_axes(logical: str, size: int) -> tuple[str, ...]:
    """The mesh axes (of the mesh in scope) that the logical axis `logical` maps to, if they split
    `size` evenly; () = not split (also when they have one shard in all: a one-device run keeps its
    plain program)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return ()
    axes = nn.logical_to_mesh_axes((logical,))[0]
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    axes = tuple(axis for axis in axes if axis in mesh.axis_names)
    shards = math.prod(int(mesh.shape[axis]) for axis in axes)
    return axes if shards > 1 and size % shards == 0 else ()


def batch_axes(batch: int) -> tuple[str, ...]:
    """The mesh axes that split a batch of `batch` rows (the logical `batch` axis)."""
    return mesh_axes("batch", batch)
