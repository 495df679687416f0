"""Per-device memory plan for a config on a mesh, from abstract shapes and AOT compilation only.

`jax.eval_shape` gives the train state (frozen base, trainables, optimizer, DPO snapshot) and its
shardings; `jit(step).lower(ShapeDtypeStructs).compile().memory_analysis()` gives activations
(plan_compile.py), the step's jaxpr its FLOPs (plan_flops.py). Nothing the size of the weights is
ever allocated, so a 7B plan runs on fake CPU devices in minutes. Report: plan_report.py.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from vsalmonn_jax.plan_compile import Compiled, Job, compile_step, parallel_jobs, run_jobs, say
from vsalmonn_jax.plan_flops import CHIPS, GB, comm_bytes, mfu
from vsalmonn_jax.plan_report import REMAT_ORDER, format_plan, suggest
from vsalmonn_jax.training.sharding import (
    LOGICAL_AXIS_RULES,
    MESH_AXES,
    dim_ways,
    fit_to_shapes,
    make_mesh,
)

__all__ = ["Compiled", "compile_step", "format_plan", "make_plan", "REMAT_ORDER", "video_tokens"]

# HBM per device (GB, vendor figures) for --device; anything else: --device-memory-gb.
DEVICE_MEMORY_GB = {name: chip.memory_gb for name, chip in CHIPS.items()}


@dataclasses.dataclass(frozen=True)
class TokenBudget:
    frames: int
    visual: int
    audio: int
    text: int

    @property
    def total(self) -> int:
        return self.visual + self.audio + self.text


def video_tokens(config, seconds: float, text_tokens: int) -> TokenBudget:
    """LLM sequence length of one video: frames x (pooled grid rows x (cols + newline)) + audio + text.

    60 s at 1 fps with SigLIP 384/14 and 2x2 max-pool: 60 x 13 x 14 = 10,920 visual tokens; audio:
    one Q-Former query per window of 25 Whisper frames (50 Hz) = 2 tokens/s -> 120.
    """
    vis, conn, data = config.model.vision, config.model.connector, config.data
    frames = min(max(1, math.ceil(seconds * float(data.fps))), int(data.max_frames))
    grid = int(vis.image_size) // int(vis.patch_size)
    stride = int(conn.pool_stride)
    pooled = math.ceil(grid / stride) if conn.pool_mode == "bilinear" else grid // stride
    per_frame = pooled * (pooled + (1 if conn.newline == "grid" else 0))
    encoder_hz = 50.0  # Whisper: 1500 encoder frames per 30 s
    per_second = encoder_hz / int(config.model.qformer.window) * int(config.model.qformer.num_queries)
    audio_seconds = max(seconds, float(data.min_audio_seconds))
    if conn.interleave == "official":  # every 30-s chunk counted whole, padding included
        chunk = float(config.model.audio.chunk_seconds)
        audio_seconds = math.ceil(audio_seconds / chunk) * chunk
    audio = int(round(audio_seconds * per_second))
    return TokenBudget(frames, frames * per_frame + (conn.newline == "video"), audio, int(text_tokens))


# ------------------------------------------------------------------ shapes, shardings, bytes

def shard_bytes(abstract: Any, shardings: Any) -> int:
    """Bytes one device holds for a tree of ShapeDtypeStructs under a tree of NamedShardings
    (an indivisible dimension counts as padded up, which is what it would cost)."""
    total = 0
    for leaf, sharding in zip(jax.tree.leaves(abstract), jax.tree.leaves(
            shardings, is_leaf=lambda s: isinstance(s, NamedSharding)), strict=True):
        shape = [-(-d // w) for d, w in zip(leaf.shape, dim_ways(sharding, len(leaf.shape)), strict=True)]
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    return total


def total_bytes(abstract: Any) -> int:
    return int(sum(int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(abstract)))


def mesh_issues(config, mesh_sizes: Mapping[str, int], global_batch: int) -> list[str]:
    """Traps that shapes alone do not show: the batch vs data x fsdp, heads vs tensor."""
    issues = []
    shards = mesh_sizes["data"] * mesh_sizes["fsdp"]
    if global_batch % shards:
        issues.append(f"global batch {global_batch} is not divisible by data x fsdp = {shards} "
                      f"(use a multiple of {shards}, e.g. {shards * max(1, -(-global_batch // shards))})")
    llm, tensor = config.model.llm, mesh_sizes["tensor"]
    for name in ("num_heads", "num_kv_heads"):
        if int(llm[name]) % tensor:
            issues.append(f"model.llm.{name} = {llm[name]} is not divisible by tensor = {tensor}: "
                          f"attention activations are padded or replicated")
    return issues


# ------------------------------------------------------------------ abstract batches

def _text(batch: int, length: int, data: NamedSharding, prefix: str = "") -> dict:
    def arr(dtype):
        return jax.ShapeDtypeStruct((batch, length), dtype, sharding=data)
    return {f"{prefix}input_ids": arr(jnp.int32), f"{prefix}attention_mask": arr(jnp.bool_),
            f"{prefix}loss_mask": arr(jnp.bool_)}


def _av_media(task, batch: int, tokens: TokenBudget, data: NamedSharding) -> dict:
    """Abstract media inputs of the AV task (pixel_values, mel and their masks) for one video."""
    from vsalmonn_jax.models.av_llm import dummy_batch

    chunks = max(1, math.ceil(tokens.audio / task.av_config.audio_tokens_per_chunk))
    example = dummy_batch(task.av_config, 1, tokens.frames, chunks, tokens.text + 1)
    return {k: jax.ShapeDtypeStruct((batch,) + v.shape[1:], v.dtype, sharding=NamedSharding(
        data.mesh, jax.sharding.PartitionSpec(*data.spec[:1], *([None] * (v.ndim - 1)))))
            for k, v in example.items() if k not in ("input_ids", "attention_mask", "loss_mask")}


def abstract_batch(task, objective: str, batch: int, tokens: TokenBudget, data: NamedSharding,
                   precomputed_reference: bool = False) -> dict:
    """ShapeDtypeStructs of one step's batch: SFT text, or DPO chosen/rejected/gt (+ reference).

    The AV task gets the video's frames and mel chunks plus `text + 1` tokens (the placeholder is
    replaced by the media, so the LLM sees `tokens.total`); the text-only task gets sequences of
    the full media + text length.
    """
    media = hasattr(task, "av_config")
    length = tokens.text + 1 if media else tokens.total
    prefixes = ("",) if objective == "sft" else ("chosen_", "rejected_", "gt_")
    out = _av_media(task, batch, tokens, data) if media else {}
    for prefix in prefixes:
        out.update(_text(batch, length, data, prefix))
    if objective == "dpo" and precomputed_reference:
        vec = jax.ShapeDtypeStruct((batch,), jnp.float32, sharding=NamedSharding(
            data.mesh, jax.sharding.PartitionSpec(*data.spec[:1])))
        out.update(ref_chosen_logps=vec, ref_rejected_logps=vec)
    return out


def make_task(config, model: str = "av"):
    """The task the plan compiles: "av" (SigLIP + Whisper + Q-Former + LLM) or "llm" (text only,
    sequences as long as the video's tokens). No tokenizer is needed: the last id is the placeholder."""
    from vsalmonn_jax.training.task import build_task

    if model == "llm":
        return build_task(config, text_only=True)
    if model != "av":
        raise ValueError(f"plan model must be av or llm, got {model!r}")
    return build_task(config, text_only=False,
                      placeholder_id=int(config.model.llm.vocab_size) - 1)


# ------------------------------------------------------------------ the plan

@dataclasses.dataclass
class Plan:
    mesh: dict[str, int]
    tokens: TokenBudget
    global_batch: int
    per_device_batch: float
    budget_gb: float
    state_gb: dict[str, float]          # per device: params, lora, adapter, opt_state, ref_adapter
    state_total_gb: dict[str, float]    # whole model (unsharded) sizes
    counts: dict[str, int]
    steps: list[Compiled]
    issues: list[str]
    suggestions: list[str]
    model: str = "av"                   # av (encoders + connectors + LLM) | llm (text only)
    notes: list[str] = dataclasses.field(default_factory=list)
    chip: str = ""                      # the CHIPS entry the MFU estimate is for ("" = none)
    seconds: float = 0.0                # wall time of make_plan
    load_average: list[float] = dataclasses.field(default_factory=list)  # host's, at the end

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["tokens"] = dict(dataclasses.asdict(self.tokens), total=self.tokens.total)
        out["steps"] = [dict(dataclasses.asdict(c), peak=c.peak) for c in self.steps]
        return out

    def fits(self, name: str, remat: str | None = None) -> bool:
        return any(c.name == name and (remat is None or c.remat == remat)
                   and c.peak <= self.budget_gb * GB for c in self.steps)


def _state_breakdown(config, mesh: Mesh, model: str, rules=LOGICAL_AXIS_RULES):
    from vsalmonn_jax.training import state as state_lib

    task = make_task(config, model)
    tx, _ = state_lib.make_optimizer(config.train, max(1, int(config.train.num_steps)))
    abstract, rule_shardings = state_lib.state_shardings(task, config, tx, mesh, rules, fit=False)
    abstract = nn.unbox(abstract)
    # what training does with a dimension the mesh does not divide: replicate it (costed as such)
    shardings, replicated = fit_to_shapes(abstract, rule_shardings)
    parts = {"params": (abstract.params, shardings.params),
             "opt_state": (abstract.opt_state, shardings.opt_state),
             "ref_adapter": (abstract.ref_adapter, shardings.ref_adapter)}
    for name in abstract.trainable:
        parts[name] = (abstract.trainable[name], shardings.trainable[name])
    per_device = {k: shard_bytes(a, s) / GB for k, (a, s) in parts.items()}
    whole = {k: total_bytes(a) / GB for k, (a, _) in parts.items()}
    whole["frozen_llm"] = total_bytes(abstract.params.get("llm", abstract.params)) / GB
    counts = {k: int(sum(int(np.prod(x.shape, dtype=np.int64)) for x in jax.tree.leaves(a)))
              for k, (a, _) in parts.items() if k != "opt_state"}
    return per_device, whole, counts, replicated


def _jobs(objectives, remat_policies, reference: bool, precomputed_reference: bool) -> list[Job]:
    """SFT under every policy; DPO, DPO with precomputed reference and the reference forward under
    the last (the policy the report compares against)."""
    last = remat_policies[-1]
    jobs = [Job(o, r) for o in objectives for r in (remat_policies if o == "sft" else (last,))]
    if "dpo" in objectives and precomputed_reference:
        jobs.append(Job("dpo", last, precomputed_reference=True))
    if "dpo" in objectives and reference:
        jobs.append(Job("dpo", last, what="reference"))
    return jobs


def _estimate(plan: Plan, config, step: Compiled, link_gb_s: float | None,
              frozen_llm_gb: float) -> None:
    """Fill step.mfu / step.estimate for plan.chip (plan_flops.OVERLAP_MODEL)."""
    chip = CHIPS[plan.chip]
    if link_gb_s:
        chip = dataclasses.replace(chip, link_gb_s=float(link_gb_s))
    total = plan.state_total_gb
    trainable = sum(total[k] for k in total if k not in ("params", "opt_state", "ref_adapter"))
    comm = comm_bytes(config, plan.mesh, step.name, step.remat, frozen_llm_gb * GB,
                      (total["params"] - frozen_llm_gb) * GB, trainable * GB,
                      plan.per_device_batch * plan.tokens.total)
    step.estimate = dict(mfu(step.flops, step.model_flops, comm, chip), comm_bytes=comm,
                         link_gb_s=chip.link_gb_s, peak_flops=chip.peak_flops)
    step.mfu = step.estimate["mfu"]


def make_plan(config, mesh_spec: Mapping[str, int], *, video_seconds: float = 60.0,
              text_tokens: int = 512, global_batch: int | None = None,
              remat_policies: Sequence[str] = ("none", "dots", "full"),
              objectives: Sequence[str] = ("sft", "dpo"), reference: bool = True,
              precomputed_reference: bool = False, budget_gb: float = 95.0,
              target_global_batch: int | None = None, model: str = "auto",
              devices: Sequence[jax.Device] | None = None, chip: str = "",
              link_gb_s: float | None = None, jobs: int = 1) -> Plan:
    """Build the mesh on the (fake) devices, size the state, compile each step, check and suggest.

    model: "av" (SigLIP + Whisper + Q-Former + LLM on frames and mel), "llm" (text-only sequences of
    the video's token count) or "auto" (av, falling back to llm with a note if the AV model fails to
    build). chip: a CHIPS name for the MFU estimate ("" = none). jobs: compiles at once (0 = as
    many as cores and host memory allow, plan_compile.parallel_jobs).
    """
    start = time.perf_counter()
    mesh = make_mesh(mesh_spec, devices)
    sizes = dict(zip(MESH_AXES, (int(mesh.shape[a]) for a in MESH_AXES), strict=True))
    shards = sizes["data"] * sizes["fsdp"]
    global_batch = shards if global_batch is None else int(global_batch)
    tokens = video_tokens(config, video_seconds, text_tokens)
    config = config.copy_and_resolve_references()
    if "logits_chunk" not in config.train:
        config.train.logits_chunk = 1024
    issues = mesh_issues(config, sizes, global_batch)
    notes: list[str] = []
    if "dpo" in objectives:  # the state then holds the round-start adapter snapshot too
        config.stage = "dpo"
    say(f"sizing the state on {sizes}")
    if model == "auto":
        try:
            breakdown = _state_breakdown(config, mesh, "av")
            model = "av"
        except Exception as err:  # noqa: BLE001 - reported in the plan, not swallowed
            notes.append(f"the AV model did not build ({type(err).__name__}: {err}); planned the "
                         f"LLM alone on {tokens.total}-token sequences")
            model = "llm"
            breakdown = _state_breakdown(config, mesh, model)
    else:
        breakdown = _state_breakdown(config, mesh, model)
    state_gb, state_total, counts, replicated = breakdown
    notes += [f"{line} on every device" for line in replicated]
    compiled: list[Compiled] = []
    if not any("global batch" in i for i in issues):
        todo = _jobs(objectives, remat_policies, reference, precomputed_reference)
        workers, why = parallel_jobs(jobs, len(todo))
        say(f"{len(todo)} compile(s): " + ", ".join(j.label for j in todo)
            + f"; {workers} at a time ({why})")
        compiled = run_jobs(config, sizes, todo, global_batch, tokens, model, workers,
                            devices=list(mesh.devices.flat))
    plan = Plan(sizes, tokens, global_batch, global_batch / shards, budget_gb, state_gb,
                {k: v for k, v in state_total.items() if k != "frozen_llm"}, counts, compiled,
                issues, [], model, notes, chip)
    if chip:
        for step in compiled:
            _estimate(plan, config, step, link_gb_s, state_total["frozen_llm"])
    plan.suggestions = suggest(plan, config, target_global_batch) if compiled else [
        "fix the issues above first: nothing was compiled"]
    plan.seconds = time.perf_counter() - start
    plan.load_average = list(os.getloadavg()) if hasattr(os, "getloadavg") else []
    return plan
