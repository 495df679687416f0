"""The human side of `plan`: remat / micro-batch / grad_accum suggestions and the printed report.

Suggestions follow one rule, the one docs/recipe.md and launch/README.md state: the fastest remat
policy whose peak leaves HEADROOM of the device memory free (XLA's CPU figures are a plan, not a
measurement); `full` is the default because it fits every mesh in launch/README.md.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from vsalmonn_jax.plan_flops import GB, OVERLAP_MODEL

if TYPE_CHECKING:
    from vsalmonn_jax.plan import Plan
    from vsalmonn_jax.plan_compile import Compiled

# Fastest first (least recomputation); the suggestion is the first that fits with headroom.
REMAT_ORDER = ("none", "dots", "save_names", "offload_names", "full")
HEADROOM = 0.10  # share of device memory a suggestion leaves free


def _misfit_hints(plan: Plan, config, name: str, best: Compiled, budget: float) -> list[str]:
    """Concrete ways out when no compiled variant fits (estimates, labelled as such)."""
    hints = []
    tensor, kv_heads = plan.mesh["tensor"], int(config.model.llm.num_kv_heads)
    if kv_heads % (2 * tensor) == 0:
        hints.append(f"mesh tensor={2 * tensor} (splits heads, MLP and vocabulary once more)")
    else:
        hints.append(f"tensor={tensor} is already the most the {kv_heads} KV heads allow")
    unshared = name.startswith("dpo") and not bool(config.dpo.get("shared_prefix", True))
    if unshared:
        hints.append("dpo.shared_prefix=True packs each pair into one row (prompt + media once)")
    if unshared and float(config.dpo.gt_ce_weight) > 0:  # shared: the GT answer is a short branch
        hints.append(f"dpo.gt_ce_weight=0 drops the ground-truth sequence from the policy forward "
                     f"(~{best.peak * 2 / 3 / GB:.0f} GB, estimate)")
    fixed = best.argument + max(0, best.output - best.alias)
    share = max(0.0, (budget - fixed) / max(best.temp, 1))
    frames = int(plan.tokens.frames * share)
    if 0 < frames < plan.tokens.frames:
        hints.append(f"data.max_frames <= ~{frames} (temp scaled linearly with length, estimate)")
    return hints


def suggest(plan: Plan, config, target_global_batch: int | None = None) -> list[str]:
    """Remat policy (the fastest that leaves HEADROOM free), examples per device per micro-step and
    grad_accum."""
    out = []
    budget = plan.budget_gb * GB
    usable = budget * (1 - HEADROOM)
    shards = plan.mesh["data"] * plan.mesh["fsdp"]
    per_dev = max(1, int(plan.per_device_batch))
    for name in dict.fromkeys(c.name for c in plan.steps if c.name != "reference"):
        runs = sorted((c for c in plan.steps if c.name == name),
                      key=lambda c: REMAT_ORDER.index(c.remat) if c.remat in REMAT_ORDER else 99)
        fitting = [c for c in runs if c.peak <= usable]
        if not fitting:
            best = min(runs, key=lambda c: c.peak)
            tight = " (fits only without the headroom)" if best.peak <= budget else ""
            out.append(f"{name}: does not fit {plan.budget_gb:.0f} GB with {HEADROOM:.0%} headroom"
                       f"{tight} (best: remat={best.remat}, peak {best.peak / GB:.1f} GB); try: "
                       + "; ".join(_misfit_hints(plan, config, name, best, usable)))
            continue
        chosen = fitting[0]
        fixed = chosen.argument + max(0, chosen.output - chosen.alias)
        micro = max(1, int((usable - fixed) // max(chosen.temp / per_dev, 1)))
        recompute = (f", recomputes {chosen.flops / chosen.model_flops - 1:.0%} on top of the "
                     f"step's FLOPs" if chosen.model_flops else "")
        line = (f"{name}: model.llm.remat_policy={chosen.remat} (the fastest compiled policy whose "
                f"peak, {chosen.peak / GB:.1f} GB, leaves {HEADROOM:.0%} of {plan.budget_gb:.0f} "
                f"free{recompute}); up to ~{micro} example(s) of {plan.tokens.total} tokens "
                f"per data x fsdp shard per micro-step (linear estimate)")
        if target_global_batch:
            per_step = shards * micro
            accum = max(1, math.ceil(target_global_batch / per_step))
            line += (f"; for {target_global_batch} per update: {per_step} per micro-step x "
                     f"train.grad_accum={accum}")
        out.append(line)
    return out


def format_plan(plan: Plan) -> str:
    """Human-readable report (GB = 1e9 bytes, per device unless said otherwise)."""
    t = plan.tokens
    lines = [
        f"mesh data={plan.mesh['data']} fsdp={plan.mesh['fsdp']} context={plan.mesh.get('context', 1)} "
        f"tensor={plan.mesh['tensor']} "
        f"({int(np.prod(list(plan.mesh.values())))} devices), budget {plan.budget_gb:.0f} GB/device",
        f"sequence: {t.frames} frames -> {t.visual} visual + {t.audio} audio + {t.text} text = "
        f"{t.total} tokens; global batch {plan.global_batch} "
        f"({plan.per_device_batch:g} per data x fsdp shard)",
        "model: " + ("SigLIP + Whisper (frozen) + connectors + LoRA Qwen2 on frames and mel"
                     if plan.model == "av" else "LoRA Qwen2 alone (text-only sequences)"),
        *(f"NOTE: {n}" for n in plan.notes),
        "",
        f"{'state':<14}{'per device GB':>15}{'whole GB':>11}{'params':>16}",
    ]
    for name, gb in plan.state_gb.items():
        count = plan.counts.get(name)
        lines.append(f"{name:<14}{gb:>15.3f}{plan.state_total_gb[name]:>11.2f}"
                     f"{(f'{count:,}' if count is not None else '-'):>16}")
    if plan.steps:
        chip = plan.chip or "-"
        lines += ["", f"{'step':<22}{'remat':<14}{'args GB':>9}{'temp GB':>9}{'peak GB':>9}"
                      f"{'fits':>6}{'TFLOP/dev':>11}{'model':>9}{'MFU ' + chip:>12}{'compile s':>11}"]
        for c in plan.steps:
            fits = "yes" if c.peak <= plan.budget_gb * GB else "NO"
            mfu = f"{c.mfu:.1%}" if c.mfu == c.mfu else "-"  # nan: no chip figures
            lines.append(f"{c.name:<22}{c.remat:<14}{c.argument / GB:>9.2f}{c.temp / GB:>9.2f}"
                         f"{c.peak / GB:>9.2f}{fits:>6}{c.flops / 1e12:>11.1f}"
                         f"{c.model_flops / 1e12:>9.1f}{mfu:>12}{c.seconds:>11.1f}")
        lines += ["(temp = activations, gradients and optimizer scratch of the compiled step; "
                  "reference = the DPO reference forward alone, i.e. what precomputing it costs)",
                  "(TFLOP/dev = matmul FLOPs of the compiled step per device, recomputation "
                  "included, counted from its jaxpr; model = the same without remat; XLA's "
                  "cost_analysis() counts each loop body once: "
                  + ", ".join(f"{c.name} {c.xla_flops / 1e12:.2f}" for c in plan.steps) + ")"]
        if plan.chip:
            lines.append(f"MFU on {plan.chip} (estimate, not a measurement): {OVERLAP_MODEL}")
            lines += [f"  {c.name} remat={c.remat}: compute {c.estimate['compute_s']:.2f} s, "
                      f"communication {c.estimate['comm_s']:.2f} s "
                      f"({c.estimate['comm_bytes'] / GB:.1f} GB/device at "
                      f"{c.estimate['link_gb_s']:.0f} GB/s)" for c in plan.steps if c.estimate]
    if plan.issues:
        lines += ["", "ISSUES:"] + [f"  - {i}" for i in plan.issues]
    lines += ["", "suggestions:"] + [f"  - {s}" for s in plan.suggestions]
    return "\n".join(lines)
