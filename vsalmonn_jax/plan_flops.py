"""FLOPs and an on-paper MFU for `plan`: matmul FLOPs counted from the step's jaxpr, a chip table
(peak bf16 FLOP/s, HBM, interconnect), a collective-bytes model and the overlap model that joins them.

Why not `compiled.cost_analysis()["flops"]` alone: XLA counts a while-loop body once, not once per
trip (measured, jax 0.10.2: a 10-step scan of one matmul reports the FLOPs of one), and the decoder
layers, the frame chunks and the attention blocks are all loops. It is reported beside, as `xla_flops`.
A while_loop's trip count is not in the jaxpr: loops built with loop_trips.counted_while declare it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import numpy as np

from vsalmonn_jax.loop_trips import mean_trips

GB = 1e9


@dataclasses.dataclass(frozen=True)
class Chip:
    memory_gb: float      # HBM per device (GB = 1e9 bytes)
    peak_flops: float     # dense bf16 FLOP/s per device (vendor figure, no sparsity)
    link_gb_s: float      # interconnect per device, one direction, GB/s (ICI / NVLink)


# Vendor figures. TPU: cloud.google.com/tpu/docs/<version> ("Peak compute per chip (bf16)",
# "Interchip Interconnect BW" / 8 bits); GPU: NVIDIA SXM data sheets, NVLink total / 2 directions.
CHIPS = {
    "v4": Chip(32.0, 275e12, 300.0),
    "v5e": Chip(16.0, 197e12, 200.0),
    "v5p": Chip(95.0, 459e12, 600.0),
    "v6e": Chip(32.0, 918e12, 448.0),
    "a100-40": Chip(40.0, 312e12, 300.0),
    "a100-80": Chip(80.0, 312e12, 300.0),
    "h100": Chip(80.0, 989e12, 450.0),
    "h200": Chip(141.0, 989e12, 450.0),
}

OVERLAP_MODEL = (
    "MFU = model FLOPs per device / (peak x step time); step time = max(compute, communication) "
    "(collectives fully overlapped with compute); compute = the compiled step's matmul FLOPs "
    "(recomputation included) / peak, i.e. matmuls at peak: an upper bound; communication = "
    "ring collectives at the chip's link bandwidth: fsdp all-gathers of the frozen weights (per "
    "pass: forward, backward, remat recompute, DPO reference), reduce-scatter / all-reduce of the "
    "fp32 trainable gradients, tensor all-reduces of the [tokens, hidden] activations (2 per "
    "layer per pass), context all-gathers of K/V (1 per layer per pass); model FLOPs = the matmul FLOPs of the same step with remat_policy=none; "
    "elementwise work, softmax and HBM traffic are not counted")


def matmul_flops(jaxpr) -> float:
    """FLOPs of every dot_general and convolution in a (closed) jaxpr, sub-jaxprs included, scan
    bodies times their length, the larger branch of a cond, a shard_map body times its shards (the
    whole computation's FLOPs, as without it). 2 x output elements x contraction. A while_loop body
    counts its loop_trips estimate times (once for a while loop without one: its trip count is not
    in the jaxpr)."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * _size(eqn.outvars[0].aval.shape) * _size(lhs[i] for i in contract)
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            out_features = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
            total += 2.0 * _size(eqn.outvars[0].aval.shape) * _size(rhs) / out_features
        subs = {k: f for k, f in ((k, _sub_flops(v)) for k, v in eqn.params.items()) if f is not None}
        if name == "while":  # the body its loop_trips estimate times
            subs["body_jaxpr"] *= mean_trips(eqn.params["body_jaxpr"])
        inner = sum(subs.values())
        if name == "cond":
            inner = max(subs.values(), default=0.0)
        if name == "shard_map":  # its body has one shard's shapes: times the shards of its manual axes
            inner *= math.prod(int(eqn.params["mesh"].shape[a]) for a in eqn.params["newly_manual_axes"])
        total += inner * (int(eqn.params["length"]) if name == "scan" else 1)
    return total


def _sub_flops(value) -> float | None:
    if hasattr(value, "eqns") or hasattr(getattr(value, "jaxpr", None), "eqns"):
        return matmul_flops(value)
    if isinstance(value, (tuple, list)) and value and all(
            hasattr(v, "eqns") or hasattr(getattr(v, "jaxpr", None), "eqns") for v in value):
        return max(matmul_flops(v) for v in value)  # cond branches
    return None


def _size(dims) -> float:
    return float(np.prod([float(d) for d in dims]))


def sequences(name: str, config) -> tuple[int, int]:
    """LLM sequences per example in a step: (trained policy, reference forward only). SFT (1, 0);
    DPO chosen + rejected (+ the GT caption when dpo.gt_ce_weight > 0) and the reference's chosen +
    rejected unless precomputed; the reference forward alone (0, 2)."""
    if name == "reference":
        return 0, 2
    if name.startswith("sft"):
        return 1, 0
    return 2 + (float(config.dpo.gt_ce_weight) > 0), 0 if "precomputed_ref" in name else 2


def comm_bytes(config, mesh: Mapping[str, int], name: str, remat: str, frozen_llm_bytes: float,
               frozen_tower_bytes: float, trainable_bytes: float, shard_tokens: float) -> float:
    """Bytes one device sends in a step (ring collectives move (n-1)/n of the full size per pass).

    frozen_*_bytes / trainable_bytes: whole-model sizes; shard_tokens: LLM tokens of one data x
    fsdp shard's examples (per-device batch x tokens per sequence), split over `context`."""
    data, fsdp, tensor = (int(mesh[a]) for a in ("data", "fsdp", "tensor"))
    context = int(mesh.get("context", 1))
    ring = lambda n: (n - 1) / n
    policy, reference = sequences(name, config)
    trained_passes = (2 + (remat != "none")) if policy else 0   # forward, backward, recompute
    weight_passes = trained_passes + (1 if reference else 0)
    total = ring(fsdp) * (weight_passes * frozen_llm_bytes + frozen_tower_bytes) / tensor
    if policy:  # trainable gradients: reduce-scatter over fsdp, all-reduce over data
        total += ring(fsdp) * trainable_bytes / tensor
        total += 2 * ring(data) * trainable_bytes / (fsdp * tensor)
    llm = config.model.llm
    width = int(llm.hidden_size) * (2 if "16" in str(llm.dtype) else 4)
    activation_passes = policy * trained_passes + reference  # in sequences x passes
    # an all-reduce moves 2 (n-1)/n of its size; 2 per layer per pass (attention and MLP outputs)
    total += 2 * ring(tensor) * shard_tokens / context * width * 2 * int(llm.num_layers) * activation_passes
    # context: each layer all-gathers K and V over `context` (forward, recompute) and reduce-scatters
    # dK / dV (backward): (n-1)/n of the whole sequence's K/V per pass; heads split over tensor
    kv_width = 2 * int(llm.num_kv_heads) * int(llm.head_dim) * width // int(llm.hidden_size) / tensor
    total += ring(context) * shard_tokens * kv_width * int(llm.num_layers) * activation_passes
    return total


def mfu(flops: float, model_flops: float, comm: float, chip: Chip) -> dict[str, float]:
    """The overlap model above for one step on one chip (per-device FLOPs and bytes)."""
    compute_s = flops / chip.peak_flops
    comm_s = comm / (chip.link_gb_s * 1e9)
    step_s = max(compute_s, comm_s)
    return {"compute_s": compute_s, "comm_s": comm_s, "step_s": step_s,
            "mfu": model_flops / (chip.peak_flops * step_s) if step_s > 0 else math.nan}
