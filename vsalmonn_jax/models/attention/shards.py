"""Which mesh axes split the batch inside attention's shard_maps (xla.py, context.py).

The logical `batch` axis's mesh axes (jax.set_mesh + flax logical rules) when they divide the batch;
none without a mesh, or for a batch they do not divide (e.g. a caption prompt: replicated).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax


def batch_axes(batch: int) -> tuple[str, ...]:
    """The mesh axes (of the mesh in scope) that split a batch of `batch` rows; () = not split (also
    when they have one shard in all: a one-device run keeps its plain program)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return ()
    axes = nn.logical_to_mesh_axes(("batch",))[0]
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    axes = tuple(axis for axis in axes if axis in mesh.axis_names)
    shards = math.prod(int(mesh.shape[axis]) for axis in axes)
    return axes if shards > 1 and batch % shards == 0 else ()
