"""Shared check of an `export` directory: transformers' Qwen2ForCausalLM loads it from the top
level and its logits equal our (unmerged) LoRA model's to 1e-4 in fp32."""

from __future__ import annotations

import pathlib

import numpy as np


def assert_export_matches(out: str | pathlib.Path, config, llm_params, lora=None, seed: int = 1):
    import torch
    import transformers

    from vsalmonn_jax.lora import LoraConfig
    from vsalmonn_jax.models.qwen2 import Qwen2, Qwen2Config

    cfg = Qwen2Config.from_config(config.model.llm)
    ids = np.random.default_rng(seed).integers(3, cfg.vocab_size, size=(2, 12)).astype(np.int32)
    model = Qwen2(cfg, lora=LoraConfig.from_config(config.model.lora) if lora else None)
    ours, _ = model.apply({"params": llm_params, **({"lora": lora} if lora else {})}, ids)
    hf = transformers.Qwen2ForCausalLM.from_pretrained(out).eval().float()
    with torch.no_grad():
        theirs = hf(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(theirs, np.asarray(ours, np.float32), atol=1e-4, rtol=0)
    return hf
