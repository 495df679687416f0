"""SFT and DPO train-step time, ours (jitted, LoRA q/k/v, AdamW) vs PyTorch (transformers Qwen2 +
the same LoRA + torch AdamW) on the same small config, batch and length; DPO/SFT peak memory.

Run: .venv/bin/python bench/train_step.py [--layers 4 --hidden 512 --seq 512 --pairs 2]
The SFT step sees the 2 x pairs sequences of the DPO batch (chosen + rejected) as plain examples, so
"same batch" means the same rows; the DPO step adds the LoRA-off reference forward. Peak memory is
the compiled step's argument + unaliased output + temp bytes (XLA memory_analysis, one device).
FLOPs: frozen base => backward = input gradients only (~1 forward); SFT = 2 forwards,
DPO = 3 forwards (policy fwd + bwd, reference fwd) of the 2 x pairs rows.
dpo_shared_vs_unshared: the prefix-shared DPO step (the default) over the unshared one
(dpo.shared_prefix=False), tiny AV model, 2,048-token prefix (video tokens from cached features + the
prompt), 3 answers of 256 tokens; CPU process time (steadier than wall time on a loaded machine).
The ours-vs-torch DPO figure is the default (prefix-shared) step against torch's unshared one.
Ends with BENCH dpo_step_vs_torch, sft_step_vs_torch, dpo_over_sft_memory, train_flops_share,
dpo_shared_vs_unshared. `--only-shared`: the last one alone.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from common import (  # noqa: E402
    add_llm_shape_args,
    bench_line,
    best_process_time,
    best_time,
    matmul_peak_flops,
)
from llm_forward import forward_flops  # noqa: E402

from vsalmonn_jax.config import load_config  # noqa: E402
from vsalmonn_jax.training import state as st  # noqa: E402
from vsalmonn_jax.training import steps as sp  # noqa: E402
from vsalmonn_jax.training.sharding import make_mesh  # noqa: E402
from vsalmonn_jax.training.task import build_task  # noqa: E402

# ----------------------------------------------------------------------------- data

def make_batches(pairs: int, seq: int, vocab: int, seed: int = 0):
    """DPO batch (chosen/rejected share a prompt of seq/2 tokens) and the SFT batch of its rows."""
    rng = np.random.default_rng(seed)
    prompt = rng.integers(3, vocab, size=(pairs, seq // 2))
    dpo = {}
    for prefix in ("chosen_", "rejected_"):
        ids = np.concatenate([prompt, rng.integers(3, vocab, size=(pairs, seq - seq // 2))], 1)
        loss = np.zeros((pairs, seq), bool)
        loss[:, seq // 2:] = True
        dpo.update({prefix + "input_ids": ids.astype(np.int32),
                    prefix + "attention_mask": np.ones((pairs, seq), bool),
                    prefix + "loss_mask": loss})
    sft = {k: np.concatenate([dpo["chosen_" + k], dpo["rejected_" + k]]) for k in
           ("input_ids", "attention_mask", "loss_mask")}
    return sft, dpo


# ----------------------------------------------------------------------------- PyTorch reference

class LoraLinear(torch.nn.Module):
    """base(x) + scale * x @ A @ B with the base frozen (PEFT's LoRA, no dropout)."""

    def __init__(self, base: torch.nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base, self.scale = base, alpha / rank
        self.a = torch.nn.Parameter(torch.empty(base.in_features, rank))
        torch.nn.init.uniform_(self.a, -1 / base.in_features ** 0.5, 1 / base.in_features ** 0.5)
        self.b = torch.nn.Parameter(torch.zeros(rank, base.out_features))
        self.enabled = True

    def forward(self, x):
        y = self.base(x)
        return y + self.scale * (x @ self.a @ self.b) if self.enabled else y


def torch_model(args):
    hf_config = transformers.Qwen2Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.inter,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, max_position_embeddings=args.seq,
        attn_implementation="sdpa")
    model = transformers.Qwen2ForCausalLM(hf_config)
    for p in model.parameters():
        p.requires_grad_(False)
    loras = []
    for layer in model.model.layers:
        for name in ("q_proj", "k_proj", "v_proj"):
            wrapped = LoraLinear(getattr(layer.self_attn, name), args.rank, 2.0 * args.rank)
            setattr(layer.self_attn, name, wrapped)
            loras.append(wrapped)
    params = [p for m in loras for p in (m.a, m.b)]
    return model.train(), loras, torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)


def torch_logps(model, ids, loss_mask):
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
    targets, mask = ids[:, 1:], loss_mask[:, 1:]
    lp = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
    return (lp * mask).sum(-1), mask.sum()


def torch_steps(args, sft, dpo):
    model, loras, opt = torch_model(args)
    params = [p for g in opt.param_groups for p in g["params"]]
    t = {k: torch.as_tensor(v) for k, v in {**sft, **dpo}.items()}
    t = {k: (v.long() if v.dtype == torch.int32 else v.float()) for k, v in t.items()}

    def sft_step():
        seq, count = torch_logps(model, t["input_ids"], t["loss_mask"])
        loss = -seq.sum() / count
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return loss.item()

    def dpo_step():
        ids = torch.cat([t["chosen_input_ids"], t["rejected_input_ids"]])
        mask = torch.cat([t["chosen_loss_mask"], t["rejected_loss_mask"]])
        n = t["chosen_input_ids"].shape[0]
        with torch.no_grad():
            for m in loras:
                m.enabled = False
            ref, _ = torch_logps(model, ids, mask)
            for m in loras:
                m.enabled = True
        pol, _ = torch_logps(model, ids, mask)
        h = (pol[:n] - ref[:n]) - (pol[n:] - ref[n:])
        loss = -torch.nn.functional.logsigmoid(0.1 * h).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return loss.item()

    return sft_step, dpo_step


# ----------------------------------------------------------------------------- ours

def our_steps(args, sft, dpo):
    overrides = [f"model.llm.{k}={v}" for k, v in dict(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.inter,
        num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.kv_heads,
        head_dim=args.hidden // args.heads, rope_theta=10000.0, remat_policy="none").items()]
    overrides += [f"model.lora.rank={args.rank}", f"model.lora.alpha={2.0 * args.rank}",
                  "model.lora.dropout=0.0", "train.lr=1e-4", "dpo.gt_ce_weight=0.0",
                  "train.num_steps=1000"]
    out = {}
    mesh = make_mesh({"data": 1}, devices=jax.devices()[:1])
    for stage, batch in (("sft", sft), ("dpo", dpo)):
        config = load_config("tiny", overrides + [f"stage={stage}"])
        task = build_task(config, text_only=True)
        tx, schedule = st.make_optimizer(config.train, 1000)
        state, shardings = st.create_train_state(task, config, tx, mesh, jax.random.PRNGKey(0))
        steps = sp.make_steps(task, config, tx, schedule, mesh, shardings)
        device = sp.put_batch(batch, steps.batch_sharding)
        with jax.set_mesh(mesh):
            import flax.linen as nn

            from vsalmonn_jax.training.sharding import LOGICAL_AXIS_RULES
            with nn.logical_axis_rules(LOGICAL_AXIS_RULES):
                compiled = steps.train.jitted.lower(state, device).compile()
        mem = compiled.memory_analysis()
        peak = (mem.argument_size_in_bytes + max(0, mem.output_size_in_bytes - mem.alias_size_in_bytes)
                + mem.temp_size_in_bytes)
        holder = {"state": state}

        def run(steps=steps, device=device, holder=holder):
            holder["state"], metrics = steps.train(holder["state"], device)
            return metrics["loss"]

        out[stage] = (run, peak)
    return out


# ----------------------------------------------------------------------------- shared vs unshared DPO

def av_dpo_batch(task, frames: int, prompt: int, response: int, pairs: int, seed: int = 0) -> dict:
    """A DPO batch of the tiny AV model, its video as cached encoder outputs (the step runs no frozen
    encoder): prefix = `prompt` text tokens (one the media placeholder) + the frames' tokens; chosen,
    rejected and GT answers of `response` tokens each."""
    from vsalmonn_jax.models import av_llm
    from vsalmonn_jax.training.feature_cache import FEATURE_PREFIX

    cfg = task.av_config
    rng = np.random.default_rng(seed)
    raw = av_llm.dummy_batch(cfg, pairs, frames, 1, 8)
    raw.pop("mel")
    raw["has_audio"][:] = False
    raw["pixel_values"] = rng.normal(size=raw["pixel_values"].shape).astype(np.float32)
    params = task.init(jax.random.PRNGKey(0), ())["params"]
    vision = jax.device_get(jax.jit(task.encode)({"params": params}, raw)["vision"])
    batch = {k: v for k, v in raw.items() if k in av_llm.MEDIA_KEYS}
    batch[FEATURE_PREFIX + "vision"] = np.asarray(vision)
    head = rng.integers(3, cfg.llm.vocab_size - 1, size=(pairs, prompt))
    head[:, 1] = cfg.placeholder_id
    width = prompt + response
    for prefix in ("chosen_", "rejected_", "gt_"):
        answer = rng.integers(3, cfg.llm.vocab_size - 1, size=(pairs, response))
        loss = np.zeros((pairs, width), bool)
        loss[:, prompt:] = True
        batch.update({prefix + "input_ids": np.concatenate([head, answer], 1).astype(np.int32),
                      prefix + "attention_mask": np.ones((pairs, width), bool),
                      prefix + "loss_mask": loss})
    return batch


def shared_vs_unshared(args) -> dict[bool, float]:
    """CPU seconds (process time) of the DPO train step with dpo.shared_prefix True / False on the
    same batch: tiny AV model, LoRA + connectors trained, GT CE on, the reference forward in the step."""
    import flax.linen as nn

    from vsalmonn_jax.training.sharding import LOGICAL_AXIS_RULES

    mesh = make_mesh({"data": 1}, devices=jax.devices()[:1])
    out, batch = {}, None
    for shared in (True, False):
        config = load_config("tiny", ["stage=dpo", f"dpo.shared_prefix={shared}",
                                      "model.lora.dropout=0.0", "train.num_steps=1000"])
        task = build_task(config, text_only=False)
        if batch is None:
            media = task.av_config.frame_tokens * args.av_frames
            batch = av_dpo_batch(task, args.av_frames, args.av_prefix - media + 1, args.av_response,
                                 args.pairs)
            print(f"AV DPO: {args.pairs} pairs, prefix {media} media + {args.av_prefix - media} text "
                  f"tokens, 3 answers x {args.av_response} tokens (chosen, rejected, GT)")
        tx, schedule = st.make_optimizer(config.train, 1000)
        state, shardings = st.create_train_state(task, config, tx, mesh, jax.random.PRNGKey(0))
        steps = sp.make_steps(task, config, tx, schedule, mesh, shardings)
        device = sp.put_batch(batch, steps.batch_sharding)
        with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
            compiled = steps.train.jitted.lower(state, device).compile()
        holder = {"state": state}

        def run(compiled=compiled, device=device, holder=holder):
            holder["state"], metrics = compiled(holder["state"], device)
            return metrics["loss"]

        out[shared] = best_process_time(run, args.repeats)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    add_llm_shape_args(p, seq=512)
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--av-prefix", type=int, default=2048, help="shared DPO bench: prefix tokens")
    p.add_argument("--av-frames", type=int, default=338, help="shared DPO bench: video frames")
    p.add_argument("--av-response", type=int, default=256, help="shared DPO bench: answer tokens")
    p.add_argument("--only-shared", action="store_true", help="only dpo_shared_vs_unshared")
    args = p.parse_args()
    shared = shared_vs_unshared(args)
    print(f"DPO step (CPU process time): prefix-shared {shared[True]:.2f} s, unshared "
          f"{shared[False]:.2f} s")
    if args.only_shared:
        bench_line("dpo_shared_vs_unshared", shared[True] / shared[False])
        return
    torch.manual_seed(0)
    sft, dpo = make_batches(args.pairs, args.seq, args.vocab)

    torch_sft, torch_dpo = torch_steps(args, sft, dpo)
    t_torch_sft = best_time(torch_sft, args.repeats)
    t_torch_dpo = best_time(torch_dpo, args.repeats)
    ours = our_steps(args, sft, dpo)
    t_sft = best_time(ours["sft"][0], args.repeats)
    t_dpo = best_time(ours["dpo"][0], args.repeats)
    peak_flops = matmul_peak_flops()

    rows = 2 * args.pairs
    fwd = forward_flops(args.layers, args.hidden, args.inter, args.heads, args.kv_heads,
                        args.hidden // args.heads, args.vocab, rows, args.seq)
    share = (2 * fwd + 3 * fwd) / (t_sft + t_dpo) / peak_flops
    print(f"config: {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}, "
          f"{rows} rows x {args.seq} tokens, LoRA r{args.rank} on q,k,v; fp32; devices "
          f"{jax.devices()[0].platform} x1, torch threads {torch.get_num_threads()}")
    print(f"SFT step: ours {t_sft * 1e3:.1f} ms, PyTorch {t_torch_sft * 1e3:.1f} ms")
    print(f"DPO step: ours {t_dpo * 1e3:.1f} ms, PyTorch {t_torch_dpo * 1e3:.1f} ms")
    print(f"peak memory (XLA): SFT {ours['sft'][1] / 2**20:.1f} MiB, DPO {ours['dpo'][1] / 2**20:.1f} MiB")
    print(f"matmul peak {peak_flops / 1e9:.1f} GFLOP/s; train FLOPs SFT {2 * fwd / 1e9:.1f} G, "
          f"DPO {3 * fwd / 1e9:.1f} G")
    bench_line("dpo_step_vs_torch", t_dpo / t_torch_dpo)
    bench_line("sft_step_vs_torch", t_sft / t_torch_sft)
    bench_line("dpo_over_sft_memory", ours["dpo"][1] / ours["sft"][1])
    bench_line("train_flops_share", share)
    bench_line("dpo_shared_vs_unshared", shared[True] / shared[False])


if __name__ == "__main__":
    main()
