"""Where the LLM's weights sit while decoding: the training layout splits every weight over fsdp,
so each decoded token all-gathers every layer again (~15 GB per device per token at 7B); gathered
once over fsdp (split over `tensor` only) the decode loop moves activations, not weights.

`generate.decode_layout`: "train" keeps the given layout; "gathered" gathers once before decoding;
"auto" gathers when the gathered copy takes at most GATHER_SHARE of a device's free memory (known
on GPU / TPU; CPU reports none: kept).
"""

from __future__ import annotations

import math

import jax
from jax.sharding import NamedSharding, PartitionSpec

LAYOUTS = ("auto", "gathered", "train")
GATHERED_AXES = ("data", "fsdp", "context")   # batch / weight-sharding axes a decode weight drops
GATHER_SHARE = 0.5


def gathered_spec(spec: PartitionSpec) -> PartitionSpec:
    """`spec` without the GATHERED_AXES (what stays: `tensor`)."""
    out = []
    for entry in spec:
        names = tuple(a for a in (entry if isinstance(entry, tuple) else (entry,))
                      if a is not None and a not in GATHERED_AXES)
        out.append(names if len(names) > 1 else (names[0] if names else None))
    return PartitionSpec(*out)


def _named(leaf) -> NamedSharding | None:
    sharding = getattr(leaf, "sharding", None)
    return sharding if isinstance(sharding, NamedSharding) else None


def _per_device(leaf, spec: PartitionSpec, mesh) -> int:
    parts = math.prod(mesh.shape[a] for entry in spec if entry is not None
                      for a in (entry if isinstance(entry, tuple) else (entry,)))
    return leaf.nbytes // parts


def gathered_bytes(variables) -> tuple[int, int]:
    """(bytes per device now, bytes per device gathered) of the NamedSharding-placed leaves."""
    now = after = 0
    for leaf in jax.tree.leaves(variables):
        sharding = _named(leaf)
        if sharding is not None:
            now += _per_device(leaf, sharding.spec, sharding.mesh)
            after += _per_device(leaf, gathered_spec(sharding.spec), sharding.mesh)
    return now, after


def _fits(variables) -> bool:
    """The gathered copy (beside the current one) takes at most GATHER_SHARE of the free memory of
    this process's first device; False when the device does not report its memory."""
    stats = jax.local_devices()[0].memory_stats() or {}
    limit, used = stats.get("bytes_limit"), stats.get("bytes_in_use", 0)
    if not limit:
        return False
    _, after = gathered_bytes(variables)
    return after <= GATHER_SHARE * (limit - used)


def _fits_everywhere(variables) -> bool:
    """_fits on every process (they must all reshard, or none: the reshard is collective)."""
    fits = _fits(variables)
    if jax.process_count() == 1:
        return fits
    from vsalmonn_jax.distributed import any_process

    return not any_process(not fits)


def decode_layout(variables, layout: str = "auto"):
    """`variables` placed for decoding by `layout` (module docstring); leaves without a
    NamedSharding (host arrays, one device) are left as they are. -> (variables, layout used)."""
    if layout not in LAYOUTS:
        raise ValueError(f"generate.decode_layout must be one of {LAYOUTS}, got {layout!r}")
    named = [leaf for leaf in jax.tree.leaves(variables) if _named(leaf) is not None]
    if layout == "train" or not named:
        return variables, "train"
    if not any(gathered_spec(_named(leaf).spec) != _named(leaf).spec for leaf in named):
        return variables, "train"   # nothing split over the gathered axes
    if layout == "auto" and not _fits_everywhere(variables):
        return variables, "train"

    shardings = jax.tree.map(
        lambda leaf: NamedSharding(_named(leaf).mesh, gathered_spec(_named(leaf).spec))
        if _named(leaf) is not None else None, variables)
    # one jitted identity: a reshard that also works for arrays spread over several processes
    return jax.jit(lambda tree: tree, out_shardings=shardings)(variables), "gathered"
