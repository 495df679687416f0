"""The device mesh `(data, fsdp, context, tensor)` and the one table mapping logical axis names to mesh axes.

Modules annotate parameters with `nn.with_logical_partitioning` and activations with
`nn.with_logical_constraint`; this table alone decides where each logical axis lives.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "context", "tensor")

# Logical name -> mesh axes. Batch is split over data and fsdp (FSDP shards the batch too);
# weights are sharded over fsdp on their embed dimension and over tensor on heads / mlp / vocab;
# the sequence of activations over context (the LLM puts it in the load-balanced layout and
# all-gathers K/V over context in attention: models/attention/context.py; size 1 = no split).
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", "context"),
    ("kv_length", "context"),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),
    ("lora_rank", None),
    ("norm", None),
    # media encoders (frozen SigLIP / Whisper) are sharded like the LLM: fsdp on their embed
    # dimension (SigLIP 1152, Whisper 1280: powers of two up to 128 / 256 divide), tensor on the MLP;
    # XLA all-gathers a layer's weights when it runs. The Q-Former's own width stays replicated.
    ("frames", "context"),   # video frames of the connector (and SigLIP's output) over context
    ("vision_embed", "fsdp"),
    ("vision_mlp", "tensor"),
    ("audio_embed", "fsdp"),
    ("audio_mlp", "tensor"),
    ("qformer_embed", None),
    ("qformer_mlp", None),
    ("conv_in", None),
    ("conv_out", None),
    ("kernel", None),
)


def mesh_shape(spec: Mapping[str, int], num_devices: int | None = None) -> tuple[int, int, int, int]:
    """Resolve {data, fsdp, context, tensor} sizes (one may be -1 = the rest) against the device count."""
    num_devices = jax.device_count() if num_devices is None else num_devices
    sizes = [int(spec.get(axis, 1)) for axis in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"{num_devices} devices do not divide into mesh {dict(zip(MESH_AXES, sizes))}")
        sizes[sizes.index(-1)] = num_devices // known
    if int(np.prod(sizes)) != num_devices:
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes))} has {int(np.prod(sizes))} devices, "
            f"but {num_devices} are available")
    return tuple(sizes)


def make_mesh(spec: Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes (data, fsdp, context, tensor); Auto axis types (logical-rule sharding style)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(spec or {"data": -1}, len(devices))
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


@contextlib.contextmanager
def logical_rules(rules=LOGICAL_AXIS_RULES) -> Iterator[None]:
    """Activate the logical-axis rules for `nn.with_logical_constraint` inside traced code."""
    with nn.logical_axis_rules(rules):
        yield


def logical_to_sharding(logical_tree, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
    """Tree of logical PartitionSpecs (from `nn.get_partition_spec`) -> tree of NamedShardings."""
    specs = nn.logical_to_mesh(logical_tree, rules)
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def sharding_of(abstract_variables, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
    """Shardings for a (boxed) variable tree, e.g. the output of `jax.eval_shape(model.init, ...)`."""
    return logical_to_sharding(nn.get_partition_spec(abstract_variables), mesh, rules)


def dim_ways(sharding: NamedSharding, ndim: int) -> list[int]:
    """How many pieces each of an array's `ndim` dimensions is cut into by the sharding's mesh axes."""
    spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
    out = []
    for axes in spec:
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        out.append(math.prod(int(sharding.mesh.shape[a]) for a in axes))
    return out


def path_name(path) -> str:
    """A tree path as 'params/llm/embed_tokens/embedding'."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def fit_to_shapes(abstract, shardings) -> tuple[Any, list[str]]:
    """`shardings` (NamedSharding tree) with every array dimension that its mesh axes do not divide
    replicated instead (jit refuses an indivisible sharding), and one line per such dimension, e.g.
    the 7B SigLIP's 1152-wide embed on fsdp = 256. `abstract`: the matching tree of shapes."""
    lines = []

    def fit(path, leaf, sharding):
        spec = tuple(sharding.spec) + (None,) * (len(leaf.shape) - len(sharding.spec))
        out = []
        for dim, (size, axes, ways) in enumerate(zip(leaf.shape, spec, dim_ways(sharding, len(spec)),
                                                     strict=True)):
            if ways > 1 and size % ways:
                names = (axes,) if isinstance(axes, str) else tuple(axes)
                lines.append(f"{path_name(path)} dim {dim} ({size}) is not divisible by "
                             f"{'x'.join(names)} = {ways}: replicated")
                axes = None
            out.append(axes)
        return NamedSharding(sharding.mesh, PartitionSpec(*out))

    fitted = jax.tree_util.tree_map_with_path(fit, abstract, shardings)
    return fitted, lines


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Inputs are sharded on their leading (batch) axis over (data, fsdp), the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
