"""Frozen-encoder throughput: SigLIP frames/s and Whisper 30-s chunks/s, ours (jitted Flax) vs
transformers PyTorch on the same small config and the same weights, in one run.

Run: .venv/bin/python bench/encoders.py [--frames 16 --chunks 4 --repeats 5]
Ends with `BENCH siglip_vs_torch <ours/PyTorch frames/s>` and
`BENCH whisper_vs_torch <ours/PyTorch chunks/s>`.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from common import bench_line, best_time  # noqa: E402

from vsalmonn_jax.models import import_hf  # noqa: E402
from vsalmonn_jax.models.siglip import SiglipConfig, SiglipVision  # noqa: E402
from vsalmonn_jax.models.whisper import WhisperConfig, WhisperEncoder  # noqa: E402


def bench_siglip(args) -> float:
    hf_cfg = transformers.SiglipVisionConfig(
        hidden_size=args.vision_hidden, intermediate_size=4 * args.vision_hidden,
        num_hidden_layers=args.vision_layers + 1, num_attention_heads=args.vision_hidden // 64,
        image_size=args.image_size, patch_size=14)
    torch_model = transformers.SiglipVisionModel(hf_cfg).eval()
    cfg = SiglipConfig(hidden_size=args.vision_hidden, intermediate_size=4 * args.vision_hidden,
                       num_layers=args.vision_layers + 1, num_heads=args.vision_hidden // 64,
                       image_size=args.image_size, patch_size=14, frame_chunk=args.frame_chunk)
    variables = {"params": jax.tree.map(jnp.asarray, import_hf.siglip_params(
        import_hf.Source(torch_model.state_dict()), cfg))}
    pixels = np.random.default_rng(0).normal(
        size=(args.frames, args.image_size, args.image_size, 3)).astype(np.float32)
    ours = jax.jit(SiglipVision(cfg).apply)
    x = jnp.asarray(pixels)
    t_ours = best_time(lambda: ours(variables, x), args.repeats)
    torch_x = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
    # the same computation in PyTorch: drop the last layer and the post-layernorm, no pooling head
    torch_model.encoder.layers = torch_model.encoder.layers[:-1]
    torch_model.post_layernorm = torch.nn.Identity()
    torch_model.use_head = False

    def torch_call():
        with torch.inference_mode():
            return torch_model(torch_x).last_hidden_state

    t_torch = best_time(torch_call, args.repeats)
    err = float(np.max(np.abs(np.asarray(ours(variables, x)) - torch_call().numpy())))
    fps_ours, fps_torch = args.frames / t_ours, args.frames / t_torch
    print(f"siglip  {cfg.used_layers} layers h{cfg.hidden_size} {cfg.num_patches} patches: ours "
          f"{fps_ours:.1f} frames/s, torch {fps_torch:.1f} frames/s (max |diff| {err:.2e})")
    return fps_ours / fps_torch


def bench_whisper(args) -> float:
    hf_cfg = transformers.WhisperConfig(
        num_mel_bins=80, d_model=args.audio_hidden, encoder_layers=args.audio_layers,
        encoder_attention_heads=args.audio_hidden // 64, encoder_ffn_dim=4 * args.audio_hidden,
        decoder_layers=1, decoder_attention_heads=args.audio_hidden // 64, vocab_size=8,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    torch_model = transformers.WhisperModel(hf_cfg).encoder.eval()
    cfg = WhisperConfig(d_model=args.audio_hidden, num_layers=args.audio_layers,
                        num_heads=args.audio_hidden // 64, ffn_dim=4 * args.audio_hidden,
                        num_mel_bins=80, chunk_batch=args.chunk_batch)
    variables = {"params": jax.tree.map(jnp.asarray, import_hf.whisper_params(
        import_hf.Source(torch_model.state_dict()), cfg))}
    mel = np.random.default_rng(1).normal(size=(args.chunks, 80, 3000)).astype(np.float32)
    ours = jax.jit(WhisperEncoder(cfg).apply)
    x = jnp.asarray(mel)
    t_ours = best_time(lambda: ours(variables, x), args.repeats)
    torch_x = torch.from_numpy(mel)

    def torch_call():
        with torch.inference_mode():
            return torch_model(torch_x).last_hidden_state

    t_torch = best_time(torch_call, args.repeats)
    err = float(np.max(np.abs(np.asarray(ours(variables, x)) - torch_call().numpy())))
    cps_ours, cps_torch = args.chunks / t_ours, args.chunks / t_torch
    print(f"whisper {cfg.num_layers} layers d{cfg.d_model} 1500 frames: ours {cps_ours:.2f} chunks/s, "
          f"torch {cps_torch:.2f} chunks/s (max |diff| {err:.2e})")
    return cps_ours / cps_torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--frame-chunk", type=int, default=16)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--vision-hidden", type=int, default=256)
    p.add_argument("--vision-layers", type=int, default=4)
    p.add_argument("--chunks", type=int, default=4)
    p.add_argument("--chunk-batch", type=int, default=4)
    p.add_argument("--audio-hidden", type=int, default=256)
    p.add_argument("--audio-layers", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"devices: jax {jax.devices()[0].platform} x{jax.device_count()}, torch CPU "
          f"{torch.get_num_threads()} threads")
    siglip = bench_siglip(args)
    whisper = bench_whisper(args)
    bench_line("siglip_vs_torch", siglip)
    bench_line("whisper_vs_torch", whisper)


if __name__ == "__main__":
    main()
